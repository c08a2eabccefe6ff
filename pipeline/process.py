"""process(ctx, inbound_id): walk the stage table for one ledger row, for first delivery, crash
recovery and replay alike.

Processing reads only the stored raw bytes and the current rules, so a crash, a retry or
`mailintake failed replay` all take this same path. Any exception marks the ledger row `failed`
with the stage and the traceback; the raw bytes stay.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TypeGuard

from sqlalchemy.exc import IntegrityError

from ingest.mail import Envelope, IncomingMail
from pipeline.attempts import error_line, record_attempt, stage_timings
from pipeline.context import PipelineContext
from pipeline.leases import INTERRUPTED_LIMIT, claim_next, lease_owner, take_lease
from pipeline.retry import retry_at
from pipeline.stages import DECIDING_STAGES, NotOurs, examine
from storage import repo
from storage.models import InboundMessage, utcnow
from storage.states import PROCESSABLE, Fate, Stage

log = logging.getLogger(__name__)


def load_and_lease(
    ctx: PipelineContext, inbound_id: int, owner: str
) -> tuple[IncomingMail, int] | None:
    """The ledger row as an IncomingMail with its processing lease taken by `owner`, in one
    committed transaction; None if it needs no processing, has no bytes to process (never
    fetched: the message is still in its mailbox, and the reason stays) or another live
    process holds it. With the mail comes how many attempts in a row died unfinished."""
    with ctx.sessions.begin() as session:
        row = session.get(InboundMessage, inbound_id)
        if not processable(row):
            return None
        mail = incoming_mail(row)
        interruptions = take_lease(session, inbound_id, owner)
        if interruptions is None:
            return None
    mail.lease_owner = owner
    return mail, interruptions


def processable(row: InboundMessage | None) -> TypeGuard[InboundMessage]:
    """A row to process: waiting or failed, with bytes (a never-fetched IMAP row has none: the
    message is still in its mailbox, and the reason stays)."""
    return row is not None and row.status in PROCESSABLE and row.fail_stage != Stage.FETCH


def incoming_mail(row: InboundMessage) -> IncomingMail:
    """A fresh IncomingMail for a ledger row, as it was received."""
    envelope = Envelope(
        source=row.source,
        mail_from=row.mail_from,
        rcpt_to=tuple(row.rcpt_to),
        peer=row.peer,
        extra=dict(row.envelope),
    )
    return IncomingMail(row.id, row.raw, envelope, row.received_at, row.dedupe_key)


def process(ctx: PipelineContext, inbound_id: int) -> Fate | None:
    """Process one ledger row; returns its fate, or None if it was not processable (done, or
    being processed by another process)."""
    leased = load_and_lease(ctx, inbound_id, lease_owner())
    if leased is None:
        return None
    mail, interruptions = leased
    return _run(ctx, mail, interruptions)


def process_next(ctx: PipelineContext) -> tuple[int, Fate | None] | None:
    """Claim the oldest waiting message no living process holds (any node's: `claim_next`)
    and process it; (its ledger id, its fate), or None when nothing is left to claim."""
    owner = lease_owner()
    claimed = claim_next(ctx.sessions, owner)
    if claimed is None:
        return None
    inbound_id, interruptions = claimed
    with ctx.sessions() as session:
        row = session.get(InboundMessage, inbound_id)
        if not processable(row):
            return inbound_id, None
        mail = incoming_mail(row)
    mail.lease_owner = owner
    return inbound_id, _run(ctx, mail, interruptions)


def _run(ctx: PipelineContext, mail: IncomingMail, interruptions: int) -> Fate | None:
    """The stages, for a message whose lease this thread took."""
    inbound_id = mail.inbound_id
    if interruptions >= INTERRUPTED_LIMIT:
        error = (
            f"processing was interrupted {interruptions} times without finishing "
            "(the process crashed or was killed while on this message); replay it when fixed"
        )
        mail.stage = Stage.INTERRUPTED
        return _record_failure(ctx, mail, RuntimeError(error))
    try:
        examine(mail, ctx)
        try:
            _decide_and_store(ctx, mail)
        except IntegrityError:
            # Another process stored the same message at the same moment; a second pass
            # sees its record and makes this delivery a duplicate.
            _decide_and_store(ctx, mail)
    except NotOurs:
        return None
    except Exception as exc:
        return _record_failure(ctx, mail, exc)
    log.info("message %s %s: %s", inbound_id, _mid(mail), mail.fate, extra=_about(mail))
    return mail.fate


def _decide_and_store(ctx: PipelineContext, mail: IncomingMail) -> None:
    """The transactional stages, committed together or not at all."""
    mail.fate = mail.decision = mail.duplicate_of = mail.drop_reason = None
    with ctx.sessions.begin() as session:
        for stage, run in DECIDING_STAGES:
            with mail.in_stage(stage):
                run(mail, ctx, session)
        assert mail.fate is not None, "the decide stage settles every message"
        repo.set_stage_timings(session, mail.inbound_id, stage_timings(mail))
        record_attempt(session, mail.inbound_id, mail.fate)


def _about(mail: IncomingMail) -> dict[str, object]:
    """The fields every log line about a message carries (as JSON keys with `log.format: json`)."""
    return {"inbound_id": mail.inbound_id, "message_id": _mid(mail)}


def _mid(mail: IncomingMail) -> str:
    return (mail.parsed.message_id if mail.parsed else None) or "(no Message-ID)"


def _record_failure(ctx: PipelineContext, mail: IncomingMail, exc: Exception) -> Fate | None:
    """Mark the message failed at its stage (with the traceback) and schedule an automatic
    retry when the failure is transient; None if the message is no longer this process's."""
    stage, owner = mail.stage, mail.lease_owner
    assert stage is not None and owner is not None, "fail a message while processing it"
    error = "".join(traceback.format_exception(exc))
    failed_at = utcnow()
    with ctx.sessions.begin() as session:
        timings = stage_timings(mail, failed=True)
        attempts = repo.mark_failed(
            session, mail.inbound_id, owner, stage, error, failed_at, stage_timings=timings
        )
        if attempts is None:
            return None
        record_attempt(session, mail.inbound_id, Fate.FAILED, stage, error)
        retry = retry_at(ctx.settings.retry, exc, attempts, failed_at)
        if retry:
            repo.schedule_retry(session, mail.inbound_id, retry)
    log.warning(
        "message %s %s failed at %s: %s", mail.inbound_id, _mid(mail), stage, error_line(exc)
    )
    return Fate.FAILED


def process_pending(
    ctx: PipelineContext, on_done: Callable[[Fate | None], None] | None = None
) -> int:
    """Process every message still `received` (new, or left by a crash); return how many."""
    with ctx.sessions() as session:
        ids = repo.pending_ids(session)
    for inbound_id in ids:
        fate = process(ctx, inbound_id)
        if on_done:
            on_done(fate)
    return len(ids)
