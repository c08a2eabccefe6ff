"""process(ctx, inbound_id): parse -> detect -> extract -> route -> store, for first delivery
and replay alike. parse, detect and extract need no database and run before the transaction.

Processing reads only the stored raw bytes and the current rules, so a crash, a retry or
`mailintake failed replay` all take this same path. Any exception marks the ledger row `failed`
with the stage and the traceback; the raw bytes stay.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.attempts import lease_abandoned, lease_owner, record_attempt
from ingest.detect import detect, find_follow_up, loop_reason
from ingest.extract import Template, extract, load_templates
from ingest.mail import Decision, Envelope, IncomingMail
from ingest.parse import parse
from ingest.retry import retry_at
from ingest.store import store, store_if_duplicate
from rules.defaults import default_decision
from storage import repo
from storage.models import InboundMessage, MessageStatus, utcnow

log = logging.getLogger(__name__)

Router = Callable[[IncomingMail, Session], Decision]


# A message whose last attempts all died unfinished (the process crashed or was killed) is
# failed, stage `interrupted`, instead of tried again: it may be what kills the process, and a
# service that restarts would otherwise crash on it forever.
INTERRUPTED_LIMIT = 3
# How long a processing lease lasts: far longer than any message takes. A holder that dies on
# this host is noticed at once; one on another host when its lease runs out.
LEASE = timedelta(minutes=10)


class MessageTooLarge(ValueError):
    pass


@dataclass
class PipelineContext:
    """What every stage may use; tests build their own."""

    settings: Settings
    sessions: sessionmaker[Session]
    router: Router
    templates: list[Template] | None = None  # None: read settings.templates.path on first use

    def source_templates(self) -> list[Template]:
        if self.templates is None:
            self.templates = load_templates(self.settings.templates.path)
        return self.templates

    @classmethod
    def with_default_routing(
        cls, settings: Settings, sessions: sessionmaker[Session]
    ) -> PipelineContext:
        return cls(
            settings, sessions, lambda mail, _session: default_decision(settings.tickets, mail)
        )


def parse_stage(mail: IncomingMail, ctx: PipelineContext) -> None:
    limit = ctx.settings.intake.max_message_bytes
    if len(mail.raw) > limit:
        raise MessageTooLarge(f"message is {len(mail.raw)} bytes, over the limit of {limit}")
    mail.parsed = parse(mail.raw)


def route_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """Follow-up detection, then the router; auto-replies that answer no ticket are dropped
    unless a rule allows them, and mail from our own notifications always is."""
    mail.follow_up_ticket_id = find_follow_up(mail, session, ctx.settings.tickets.key_prefix)
    decision = ctx.router(mail, session)
    no_ticket_to_join = mail.follow_up_ticket_id is None
    loop = loop_reason(mail, ctx.settings.detect.own_senders)
    if loop:
        decision.drop_reason = loop  # a ticket or comment would feed the loop
    elif mail.auto_reply and no_ticket_to_join and not decision.allow_auto_reply:
        decision.drop_reason = decision.drop_reason or f"auto-reply: {mail.auto_reply}"
    mail.decision = decision


def examine(mail: IncomingMail, ctx: PipelineContext) -> None:
    """The stages before routing, which need no database: parse, detect, extract. `rules test`
    and `rules diff` run them too."""
    mail.stage = "parse"
    parse_stage(mail, ctx)
    mail.stage = "detect"
    detect(mail)
    mail.stage = "extract"
    extract(mail, ctx.source_templates())


def load(ctx: PipelineContext, inbound_id: int) -> IncomingMail | None:
    """The ledger row as an IncomingMail, or None if it needs no processing or has no bytes to
    process (never fetched: the message is still in its mailbox, and the reason stays)."""
    with ctx.sessions() as session:
        row = session.get(InboundMessage, inbound_id)
        if row is None or row.status not in repo.PROCESSABLE:
            return None
        if row.fail_stage == repo.UNFETCHED_STAGE:
            return None
        return incoming_mail(row)


def incoming_mail(row: InboundMessage) -> IncomingMail:
    """A fresh IncomingMail for a ledger row, as it was received."""
    envelope = Envelope(
        source=row.source,
        mail_from=row.mail_from,
        rcpt_to=tuple(row.rcpt_to),
        peer=row.peer,
        extra=dict(row.envelope),
    )
    return IncomingMail(row.id, row.raw, envelope, row.received_at, dedupe_key=row.dedupe_key)


def process(ctx: PipelineContext, inbound_id: int) -> MessageStatus | None:
    """Process one ledger row; returns its fate, or None if it was not processable (done, or
    being processed by another process)."""
    mail = load(ctx, inbound_id)
    if mail is None:
        return None
    owner = lease_owner()
    interruptions = _take_lease(ctx, inbound_id, owner)
    if interruptions is None:
        return None
    if interruptions >= INTERRUPTED_LIMIT:
        error = (
            f"processing was interrupted {interruptions} times without finishing "
            "(the process crashed or was killed while on this message); replay it when fixed"
        )
        return _record_failure(ctx, mail, owner, "interrupted", RuntimeError(error))
    try:
        examine(mail, ctx)
        try:
            fate = _route_and_store(ctx, mail, owner)
        except IntegrityError:
            # Another process stored the same message at the same moment; a second pass
            # sees its record and makes this delivery a duplicate.
            fate = _route_and_store(ctx, mail, owner)
    except Exception as exc:
        return _record_failure(ctx, mail, owner, mail.stage, exc)
    if fate is not None:
        log.info("message %s %s: %s", inbound_id, _mid(mail), fate)
    return fate


def _take_lease(ctx: PipelineContext, inbound_id: int, owner: str) -> int | None:
    """Become the one process working on the message, committed before the work starts.

    Returns how many attempts in a row were interrupted (their lease left behind), or None if
    the message is done or another live process holds it.
    """
    now = utcnow()
    with ctx.sessions.begin() as session:
        seen = repo.lease_of(session, inbound_id)
        if seen is None or seen.status not in repo.PROCESSABLE:
            return None
        if seen.owner is not None and not lease_abandoned(seen.owner, seen.until, now):
            return None
        taken = repo.take_lease(session, inbound_id, seen, owner, now + LEASE)
    return taken[1] if taken else None


def _route_and_store(ctx: PipelineContext, mail: IncomingMail, owner: str) -> MessageStatus | None:
    """The transactional part: claim, route, store, all committed together or not at all."""
    with ctx.sessions.begin() as session:
        mail.stage = "claim"
        if not repo.claim(session, mail.inbound_id, owner):
            return None
        if store_if_duplicate(session, mail):
            fate = MessageStatus.DUPLICATE
        else:
            mail.stage = "route"
            route_stage(mail, ctx, session)
            mail.stage = "store"
            fate = store(session, mail, ctx.settings.tickets.key_prefix)
        record_attempt(session, mail.inbound_id, fate)
        return fate


def _mid(mail: IncomingMail) -> str:
    return (mail.parsed.message_id if mail.parsed else None) or "(no Message-ID)"


def _record_failure(
    ctx: PipelineContext, mail: IncomingMail, owner: str, stage: str, exc: Exception
) -> MessageStatus | None:
    """Mark the message failed (with the traceback) and schedule an automatic retry when the
    failure is transient; None if the message is no longer this process's to fail."""
    error = "".join(traceback.format_exception(exc))
    failed_at = utcnow()
    with ctx.sessions.begin() as session:
        attempts = repo.mark_failed(session, mail.inbound_id, owner, stage, error, failed_at)
        if attempts is None:
            return None
        record_attempt(session, mail.inbound_id, MessageStatus.FAILED, stage, error)
        retry = retry_at(ctx.settings.retry, exc, attempts, failed_at)
        if retry:
            repo.schedule_retry(session, mail.inbound_id, retry)
    log.warning(
        "message %s %s failed at %s: %s: %s",
        mail.inbound_id,
        _mid(mail),
        stage,
        type(exc).__name__,
        exc,
    )
    return MessageStatus.FAILED


def process_pending(
    ctx: PipelineContext, on_done: Callable[[MessageStatus | None], None] | None = None
) -> int:
    """Process every message still `received` (new, or left by a crash); return how many."""
    with ctx.sessions() as session:
        ids = repo.pending_ids(session)
    for inbound_id in ids:
        fate = process(ctx, inbound_id)
        if on_done:
            on_done(fate)
    return len(ids)
