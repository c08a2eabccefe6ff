"""The rule playground: edit a rules file's text, route stored messages (or an uploaded .eml)
with it and see why each rule matched or missed (`rules test`), and which of the last days'
mails it would route differently from the running rules (`rules diff`). The text is compiled
from a temporary copy; the rules file itself is never written."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from ingest.intake import unstored_mail
from ingest.mail import Envelope, IncomingMail
from pipeline.dryrun import DryRouter, diff, outcome
from pipeline.process import incoming_mail
from rules.engine import CompiledRules
from rules.load import RulesError, load_rules
from storage import repo
from storage.models import InboundMessage, utcnow
from storage.states import Source
from views.mail import explained
from web.auth import User
from web.ledger import HEADER_BYTES, row_of
from web.site import Site, form_of

PICKABLE = 30  # recent messages offered to route
MAX_DAYS = 31
MAX_RULES_CHARS = 1024 * 1024


def compile_text(site: Site, text: str) -> tuple[CompiledRules | None, list[str]]:
    """The rules in `text`, or the problems `rules check` would list (with line and column)."""
    with tempfile.TemporaryDirectory(prefix="mailintake-playground-") as folder:
        path = Path(folder) / "rules.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_rules(path, site.settings.zone, site.settings.authserv_id), []
        except RulesError as exc:
            return None, [str(p).replace(f"{folder}/", "") for p in exc.problems]


def recent(site: Site) -> list[dict[str, Any]]:
    with site.sessions() as session:
        found = repo.ledger_with_head(session, repo.LedgerFilter(), PICKABLE, HEADER_BYTES, None)
        return [row_of(m, head, key) for m, head, key in found]


def running_text(site: Site) -> str:
    rules = site.rules()
    if rules is None:
        return ""
    try:
        return rules.path.read_text(encoding="utf-8")
    except OSError:
        return ""


@dataclass(frozen=True)
class Sample:
    """A mail to try the rules on; each routing gets a fresh copy (routing fills it in)."""

    label: str
    read: IncomingMail

    def mail(self) -> IncomingMail:
        m = self.read
        return IncomingMail(m.inbound_id, m.raw, m.envelope, m.received_at, m.dedupe_key)


def samples(site: Site, ids: list[int], upload: tuple[str, bytes] | None) -> list[Sample]:
    """The ticked stored messages, then the uploaded file."""
    chosen = []
    with site.sessions() as session:
        for inbound_id in ids:
            row = session.get(InboundMessage, inbound_id)
            if row is not None:
                chosen.append(Sample(f"ledger #{inbound_id}", incoming_mail(row)))
    if upload is not None:
        name, raw = upload
        envelope = Envelope(source=Source.FILE, extra={"origin": name})
        chosen.append(Sample(name, unstored_mail(raw, envelope, utcnow())))
    return chosen


def try_rules(site: Site, new: CompiledRules, chosen: list[Sample], days: int) -> dict[str, Any]:
    """Each sample explained under `new` (and decided by the running rules), and the diff."""
    current = site.rules()
    router = DryRouter(site.settings, site.sessions, new)
    before = DryRouter(site.settings, site.sessions, current) if current else None
    results = []
    for sample in chosen:
        mail = sample.mail()
        try:
            result = explained(Path(sample.label), mail, router.route(mail))
            result["now"] = outcome(mail)
            if before is not None:
                old = sample.mail()
                before.route(old)
                result["running"] = outcome(old)
        except Exception as exc:  # a mail that cannot be routed is a result
            results.append({"file": sample.label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(result)
    changes = None
    if current is not None:
        replayed, found = diff(
            site.settings, site.sessions, current, new, utcnow() - timedelta(days=days)
        )
        changes = {"replayed": replayed, "changed": found}
    return {"results": results, "diff": changes}


async def playground(site: Site, request: Request, user: User) -> Response:
    text = await run_in_threadpool(running_text, site)
    picks = await run_in_threadpool(recent, site)
    return site.render(
        request, user, "playground.html", text=text, picks=picks, picked=set(), days=7
    )


async def try_out(site: Site, request: Request, user: User) -> Response:
    form = form_of(request)
    text = str(form.get("rules") or "")[:MAX_RULES_CHARS]
    ids = [int(v) for v in form.getlist("id") if isinstance(v, str) and v.isdigit()]
    days_field = str(form.get("days") or "7")
    days = min(max(int(days_field), 1), MAX_DAYS) if days_field.isdigit() else 7
    upload, upload_problem = await read_upload(site, form.get("eml"))
    new, problems = await run_in_threadpool(compile_text, site, text)
    if upload_problem:
        problems.append(upload_problem)
    picks = await run_in_threadpool(recent, site)
    values: dict[str, Any] = {"text": text, "picks": picks, "picked": set(ids), "days": days}
    if new is None or upload_problem:
        return site.render(request, user, "playground.html", problems=problems, **values)
    chosen = await run_in_threadpool(samples, site, ids, upload)
    tried = await run_in_threadpool(try_rules, site, new, chosen, days)
    return site.render(
        request,
        user,
        "playground.html",
        warnings=new.warnings,
        version=new.version[:12],
        **tried,
        **values,
    )


async def read_upload(site: Site, field: Any) -> tuple[tuple[str, bytes] | None, str | None]:
    """(file name, bytes) of the uploaded .eml if any, or the problem with it."""
    if not isinstance(field, UploadFile) or not field.filename:
        return None, None
    limit = site.settings.intake.max_message_bytes
    raw = await field.read(limit + 1)
    name = Path(field.filename).name
    if len(raw) > limit:
        return None, f"{name}: larger than intake.max_message_bytes ({limit} bytes)"
    if not raw:
        return None, f"{name}: the file is empty"
    return (name, raw), None
