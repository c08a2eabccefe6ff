"""process(ctx, inbound_id): walk the stage table for one ledger row, for first delivery, crash
recovery and replay alike.

Processing reads only the stored raw bytes and the current rules, so a crash, a retry or
`mailintake failed replay` all take this same path. Any exception marks the ledger row `failed`
with the stage and the traceback; the raw bytes stay.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ingest.mail import Envelope, IncomingMail
from pipeline.attempts import error_line, record_attempt, stage_timings
from pipeline.context import PipelineContext
from pipeline.leases import INTERRUPTED_LIMIT, claim_next_in, lease_owner, take_lease
from pipeline.retry import retry_at
from pipeline.stages import DECIDING_STAGES, NotOurs, examine
from storage import repo
from storage.models import InboundMessage, utcnow
from storage.states import PROCESSABLE, Fate, Stage

log = logging.getLogger(__name__)

Leased = tuple[IncomingMail, int]  # a message whose lease was taken, and its interruptions so far
T = TypeVar("T")
Ledger = TypeVar("Ledger", InboundMessage, Row[Any])  # a ledger row: the ORM object or columns


def load_and_lease(
    ctx: PipelineContext, inbound_id: int, owner: str
) -> tuple[IncomingMail, int] | None:
    """The ledger row as an IncomingMail with its processing lease taken by `owner`, in one
    committed transaction; None if it needs no processing, has no bytes to process (never
    fetched: the message is still in its mailbox, and the reason stays) or another live
    process holds it. With the mail comes how many attempts in a row died unfinished."""
    with ctx.sessions.begin() as session:
        return lease_in(session, inbound_id, owner)


def lease_in(session: Session, inbound_id: int, owner: str) -> Leased | None:
    """`load_and_lease` in the caller's transaction: the row is read once, and its lease taken
    from what was read (compare-and-set), with no second look-up."""
    row = repo.row_to_process(session, inbound_id)
    if not processable(row):
        return None
    seen = repo.Lease(row.status, row.lease_owner, row.lease_until)
    interruptions = take_lease(session, inbound_id, owner, seen)
    if interruptions is None:
        return None
    mail = incoming_mail(row)
    mail.lease_owner = owner
    return mail, interruptions


@dataclass
class Chain(Generic[T]):
    """The next message's lease, taken by `take` in the transaction that commits this one's
    outcome: one commit per message, and the lease is still committed before its work starts,
    so a crash on the next message counts as its interrupted attempt as before. `taken` stays
    None when that transaction did not commit (a failure, a lost lease): the caller then takes
    the next lease on its own."""

    take: Callable[[Session], T | None]
    taken: T | None = None
    committed: bool = False  # `take` ran in a committed transaction (`taken` None: none left)


def processable(row: Ledger | None) -> TypeGuard[Ledger]:
    """A row to process: waiting or failed, with bytes (a never-fetched IMAP row has none: the
    message is still in its mailbox, and the reason stays)."""
    return row is not None and row.status in PROCESSABLE and row.fail_stage != Stage.FETCH


def incoming_mail(row: InboundMessage | Row[Any]) -> IncomingMail:
    """A fresh IncomingMail for a ledger row, as it was received: the ORM object, or the
    columns `repo.row_to_process` reads (no ORM object to build: processing only reads)."""
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
    return next(process_waiting(ctx, lambda: True, chained=False), None)


def process_waiting(
    ctx: PipelineContext, more: Callable[[], bool], *, chained: bool = True
) -> Iterator[tuple[int, Fate | None]]:
    """Claim and process waiting messages one after another (`claim_next`) while `more()`;
    each message's ledger id and fate. `chained`: each next claim is taken in the transaction
    that stores the previous outcome (`Chain`). A claim taken is always processed."""
    owner = lease_owner()
    claimed = None
    while True:
        if claimed is None:
            if not more():
                return
            with ctx.sessions.begin() as session:
                claimed = _claim_in(session, owner)
            if claimed is None:
                return
        inbound_id, leased = claimed
        chain = Chain(lambda session: _claim_in(session, owner) if more() else None)
        fate = _run(ctx, *leased, chain if chained else None) if leased else None
        yield inbound_id, fate
        if chain.committed and chain.taken is None:
            return  # nothing was left to claim (or a stop was asked for) a moment ago
        claimed = chain.taken


def _claim_in(session: Session, owner: str) -> tuple[int, Leased | None] | None:
    claimed = claim_next_in(session, owner)
    if claimed is None:
        return None
    inbound_id, interruptions = claimed
    row = repo.row_to_process(session, inbound_id)
    if not processable(row):
        return inbound_id, None
    mail = incoming_mail(row)
    mail.lease_owner = owner
    return inbound_id, (mail, interruptions)


def process_in_order(ctx: PipelineContext, ids: Sequence[int]) -> Iterator[Fate | None]:
    """`process` for each of `ids` in turn, each next lease taken in the transaction that
    stores the previous outcome (`Chain`): one commit per message on the normal path."""
    owner = lease_owner()
    taken: Leased | None = None
    for position, inbound_id in enumerate(ids):
        leased = taken or load_and_lease(ctx, inbound_id, owner)
        taken = None
        if leased is None:
            yield None
            continue
        chain: Chain[Leased] | None = None
        if position + 1 < len(ids):
            chain = Chain(functools.partial(lease_in, inbound_id=ids[position + 1], owner=owner))
        yield _run(ctx, *leased, chain)
        taken = chain.taken if chain else None


def _run(
    ctx: PipelineContext, mail: IncomingMail, interruptions: int, chain: Chain | None = None
) -> Fate | None:
    """The stages, for a message whose lease this thread took; `chain`: the next lease to take
    in the outcome's transaction."""
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
            _decide_and_store(ctx, mail, chain)
        except IntegrityError:
            # Another process stored the same message at the same moment; a second pass
            # sees its record and makes this delivery a duplicate.
            _decide_and_store(ctx, mail, chain)
    except NotOurs:
        return None
    except Exception as exc:
        return _record_failure(ctx, mail, exc)
    log.info("message %s %s: %s", inbound_id, _mid(mail), mail.fate, extra=_about(mail))
    return mail.fate


def _decide_and_store(ctx: PipelineContext, mail: IncomingMail, chain: Chain | None) -> None:
    """The transactional stages, committed together or not at all (with `chain`'s lease)."""
    mail.fate = mail.decision = mail.duplicate_of = mail.drop_reason = None
    with ctx.sessions.begin() as session:
        for stage, run in DECIDING_STAGES:
            with mail.in_stage(stage):
                run(mail, ctx, session)
        assert mail.fate is not None, "the decide stage settles every message"
        record_attempt(session, mail.inbound_id, mail.fate)
        taken = chain.take(session) if chain else None
    if chain:
        chain.taken, chain.committed = taken, True


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
    for fate in process_in_order(ctx, ids):
        if on_done:
            on_done(fate)
    return len(ids)
