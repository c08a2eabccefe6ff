"""The dashboard: backlog, failures, fetchers, rules version, and an SVG chart of messages
per hour by fate over the last 7 days (drawn on the server: no script)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from storage import repo
from storage.models import utcnow
from storage.states import Fate
from views.status import collect_status
from web.auth import User
from web.site import Site

CHART_HOURS = 7 * 24
BAR_WIDTH = 4
CHART_HEIGHT = 120
FATE_COLOURS = {
    Fate.TICKET: "#2f7d32",
    Fate.COMMENT: "#1565c0",
    Fate.DUPLICATE: "#8d8d8d",
    Fate.DROPPED: "#c9a227",
    Fate.DISCARDED: "#6d4c41",
    Fate.FAILED: "#c62828",
    Fate.RECEIVED: "#7b1fa2",
}


@dataclass(frozen=True)
class Bar:
    """One coloured piece of an hour's stacked bar, in SVG units."""

    x: int
    y: float
    height: float
    colour: str
    title: str


def chart(site: Site, counts: list[tuple[datetime, str, int]], now: datetime) -> dict[str, Any]:
    """Stacked bars, one per hour, oldest on the left."""
    first = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    first -= timedelta(hours=CHART_HOURS - 1)
    per_hour: dict[int, dict[str, int]] = {}
    for hour, fate, count in counts:
        slot = int((hour - first).total_seconds() // 3600)
        if 0 <= slot < CHART_HOURS:
            per_hour.setdefault(slot, {})[fate] = count
    peak = max((sum(v.values()) for v in per_hour.values()), default=0)
    bars = []
    for slot, fates in sorted(per_hour.items()):
        top = float(CHART_HEIGHT)
        label = site.when(first + timedelta(hours=slot))[:13] + "h"
        for fate in FATE_COLOURS:
            count = fates.get(fate, 0)
            if count:
                height = CHART_HEIGHT * count / peak
                top -= height
                title = f"{label}: {count} {fate}"
                bars.append(Bar(slot * BAR_WIDTH, top, height, FATE_COLOURS[fate], title))
    days = [
        {"x": slot * BAR_WIDTH, "label": site.when(first + timedelta(hours=slot))[5:10]}
        for slot in range(CHART_HOURS)
        if (first + timedelta(hours=slot)).astimezone(site.settings.zone).hour == 0
    ]
    return {
        "bars": bars,
        "days": days,
        "peak": peak,
        "width": CHART_HOURS * BAR_WIDTH,
        "height": CHART_HEIGHT,
        "legend": [(str(f), c) for f, c in FATE_COLOURS.items()],
    }


def figures(site: Site) -> dict[str, Any]:
    """The `mailintake status` figures (views.status) plus fetchers, rules and the chart."""
    now = utcnow()
    with site.sessions() as session:
        status = collect_status(session, now)
        hourly = repo.fates_per_hour(session, now - timedelta(hours=CHART_HOURS))
    rules = site.rules()
    fetchers = [
        {
            "label": f.label,
            "state": "stalled" if f.stalled else f.state,
            "quiet": round(f.seconds_since_success),
        }
        for f in site.parts.fetchers
    ]
    return {
        "counts": status.by_status,
        "backlog": status.backlog,
        "oldest": status.oldest_unprocessed_at,
        "failed": status.by_status[Fate.FAILED],
        "failed_by_stage": status.failed_by_stage,
        "retries": status.retries_scheduled,
        "retries_due": status.retries_due,
        "fetchers": fetchers,
        "rules": {"version": rules.version[:12], "path": rules.path, "count": len(rules.rules)}
        if rules
        else None,
        "chart": chart(site, hourly, now),
    }


async def dashboard(site: Site, request: Request, user: User) -> Response:
    values = await run_in_threadpool(figures, site)
    return site.render(request, user, "dashboard.html", **values)
