"""Failed messages grouped by stage and reason; replay one, a selection or every message of a
reason, discard with a reason. The actions are `pipeline.replay.replay` and `discard`, the
functions `mailintake failed replay` and `failed discard` call: a message makes one ticket at
most, whoever replays it and however often."""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from pipeline.replay import discard, replay, select_failed
from storage import repo
from storage.models import InboundMessage, Ticket
from views.records import failed_view
from web.auth import User
from web.site import Site, form_of, refusal

log = logging.getLogger(__name__)

LISTED = 500  # failed messages on the page (the counts are of these)
HEADER_BYTES = 16 * 1024
SHOWN_OUTCOMES = 200  # a result page lists this many messages and counts the rest


def groups(site: Site) -> list[dict[str, Any]]:
    """The failed messages by (stage, reason), largest group first."""
    with site.sessions() as session:
        found = repo.failed_with_head(session, repo.FailedFilter(), LISTED, HEADER_BYTES)
        rows = [failed_view(message, head) for message, head in found]
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["stage"] or "", row["error"] or ""), []).append(row)
    ordered = sorted(grouped.items(), key=lambda item: -len(item[1]))
    return [{"stage": s, "reason": r, "rows": members} for (s, r), members in ordered]


async def failures(site: Site, request: Request, user: User) -> Response:
    found = await run_in_threadpool(groups, site)
    return site.render(request, user, "failures.html", groups=found, listed=LISTED)


def chosen_ids(values: list[Any]) -> list[int]:
    return [int(v) for v in values if isinstance(v, str) and v.isdigit()]


def outcome_rows(site: Site, outcomes: dict[int, str]) -> list[dict[str, Any]]:
    """Each message's outcome with the ticket it now belongs to."""
    rows = []
    with site.sessions() as session:
        for inbound_id, outcome in list(outcomes.items())[:SHOWN_OUTCOMES]:
            message = session.get(InboundMessage, inbound_id)
            ticket = message.ticket_id if message is not None else None
            key = session.get_one(Ticket, ticket).key if ticket else None
            rows.append({"id": inbound_id, "outcome": outcome, "ticket": key})
    return rows


def run_replay(site: Site, ids: list[int]) -> dict[str, Any]:
    result = replay(site.pipeline(), ids)
    return {"counts": result.counts(), "rows": outcome_rows(site, result.outcomes)}


async def replay_action(site: Site, request: Request, user: User) -> Response:
    """Replay the ticked messages, or every failed one of a stage and reason (`all_of`)."""
    form = form_of(request)
    if form.get("all_of"):
        wanted = repo.FailedFilter(
            stage=str(form.get("stage") or "") or None, error=str(form.get("reason") or "") or None
        )
        ids = await run_in_threadpool(select_failed, site.sessions, wanted)
    else:
        ids = chosen_ids(form.getlist("id"))
    if not ids:
        return refusal(site, request, user, 400, "Tick the messages to replay.")
    done = await run_in_threadpool(run_replay, site, ids)
    # The attempts name the serve process; this line names the person.
    log.info("web user %s replayed %d message(s): %s", user.name, len(ids), done["counts"])
    return site.render(request, user, "outcome.html", action="replay", selected=len(ids), **done)


async def discard_action(site: Site, request: Request, user: User) -> Response:
    form = form_of(request)
    ids = chosen_ids(form.getlist("id"))
    reason = str(form.get("discard_reason") or "").strip()
    if not ids or not reason:
        message = "Tick the messages to discard and say why (the reason is kept for audit)."
        return refusal(site, request, user, 400, message)
    results = await run_in_threadpool(discard, site.sessions, ids, reason)
    log.info("web user %s discarded %s: %s", user.name, list(results), reason)
    rows = [{"id": i, "outcome": r, "ticket": None} for i, r in results.items()]
    counts: dict[str, int] = {}
    for result in results.values():
        counts[result] = counts.get(result, 0) + 1
    return site.render(
        request, user, "outcome.html", action="discard", selected=len(ids), counts=counts, rows=rows
    )
