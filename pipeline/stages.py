"""The stages a message goes through, as one named table (like GNU Mailman's
`core/pipelines.py`): plain functions that read and fill the one `IncomingMail`.

`EXAMINE_STAGES` need no database and run before any transaction (parse, detect, extract);
`rules test` and `parse` run them too. `DECIDING_STAGES` run in one transaction, committed
together or not at all: recognise a re-delivery, find the ticket a reply answers, ask the
triage model (when one is stored), route, make the one decision "ticket, comment, duplicate or
drop", claim the row, pick the assignee (only for a certain new ticket, so nothing else moves a
round-robin cursor), store. The stages before `claim` only read: its UPDATE is the first write,
which on SQLite takes the one write lock of the database, so the lock is not held while routing
runs (the SMTP listener waits on it to commit new mail).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from ingest.detect import detect, find_follow_up, loop_reason
from ingest.extract import extract
from ingest.mail import Earlier, IncomingMail
from ingest.parse import parse
from ingest.verify import verify
from pipeline.context import PipelineContext, with_ticket_defaults
from pipeline.store import store
from storage import repo
from storage.states import Fate, Stage
from triage.store import suggest

ExamineStage = Callable[[IncomingMail, PipelineContext], None]
DecidingStage = Callable[[IncomingMail, PipelineContext, Session], None]


class MessageTooLarge(ValueError):
    pass


class NotOurs(Exception):
    """The row is no longer this process's to work on (done, or its lease taken over)."""


def parse_stage(mail: IncomingMail, ctx: PipelineContext) -> None:
    limit = ctx.settings.intake.max_message_bytes
    if len(mail.raw) > limit:
        raise MessageTooLarge(f"message is {len(mail.raw)} bytes, over the limit of {limit}")
    mail.parsed = parse(mail.raw)
    if ctx.settings.verify.enabled:  # our own DKIM/SPF/DMARC/ARC verdicts (ingest/verify.py)
        verify(mail, ctx.settings, ctx.verify_dns())


def detect_stage(mail: IncomingMail, ctx: PipelineContext) -> None:
    detect(mail)


def extract_stage(mail: IncomingMail, ctx: PipelineContext) -> None:
    settings = ctx.settings
    extract(mail, ctx.source_templates(), settings.zone, settings.authserv_id)


def claim_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """Lock the row for this transaction while this thread holds its lease: the first write,
    after the stages that only read (a lost lease costs their work, never a write)."""
    if mail.lease_owner is None or not repo.claim(session, mail.inbound_id, mail.lease_owner):
        raise NotOurs(mail.inbound_id)


def dedupe_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """A re-delivery of a message that already made its record is a duplicate: decided here,
    before routing, so it costs no rule work."""
    earlier = repo.first_record_of(session, mail.dedupe_key, mail.inbound_id)
    if earlier is not None:
        mail.duplicate_of = Earlier(earlier.id, earlier.ticket_id)
        mail.fate = Fate.DUPLICATE


def follow_up_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    if mail.fate is None:
        mail.follow_up_ticket_id = find_follow_up(mail, session, ctx.settings.tickets.key_prefix)


def suggest_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """When a triage model is stored, what it suggests for a new ticket (docs/triage.md). The
    rules decide; they take the suggestion only where a rule asks for it."""
    if mail.fate is None and mail.follow_up_ticket_id is None:
        mail.suggestion = suggest(mail, session)


def route_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """Ask the router; it reads the mail and the rules and writes nothing."""
    if mail.fate is None:
        mail.decision = with_ticket_defaults(ctx.router(mail), ctx.settings.tickets)


def decide_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """The one decision: drop, comment on the ticket it answers, or open a ticket."""
    if mail.fate is not None:
        return
    mail.drop_reason = drop_reason(mail, ctx.settings.detect.own_senders)
    if mail.drop_reason:
        mail.fate = Fate.DROPPED
    elif mail.follow_up_ticket_id is not None:
        mail.fate = Fate.COMMENT
    else:
        mail.fate = Fate.TICKET


def drop_reason(mail: IncomingMail, own_senders: list[str]) -> str | None:
    """Why a routed mail opens nothing: a loop (a ticket or comment would feed it), a rule's
    `drop`, or an auto-reply that answers no ticket and that no rule lets through."""
    decision = mail.decision
    assert decision is not None, "decide after routing"
    loop = loop_reason(mail, own_senders)
    if loop:
        return loop
    if decision.drop_reason:
        return decision.drop_reason
    if mail.auto_reply and mail.follow_up_ticket_id is None and not decision.allow_auto_reply:
        return f"auto-reply: {mail.auto_reply}"
    return None


def assign_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    """Pick the team member for a new ticket; nothing else takes a round-robin turn."""
    decision = mail.decision
    if mail.fate is Fate.TICKET and decision is not None and decision.assign is not None:
        decision.assignee = decision.assign(session)


def store_stage(mail: IncomingMail, ctx: PipelineContext, session: Session) -> None:
    store(session, mail, ctx.settings.tickets.key_prefix)


EXAMINE_STAGES: tuple[tuple[Stage, ExamineStage], ...] = (
    (Stage.PARSE, parse_stage),
    (Stage.DETECT, detect_stage),
    (Stage.EXTRACT, extract_stage),
)
DECIDING_STAGES: tuple[tuple[Stage, DecidingStage], ...] = (
    (Stage.DEDUPE, dedupe_stage),
    (Stage.FOLLOW_UP, follow_up_stage),
    (Stage.SUGGEST, suggest_stage),
    (Stage.ROUTE, route_stage),
    (Stage.DECIDE, decide_stage),
    (Stage.CLAIM, claim_stage),
    (Stage.ASSIGN, assign_stage),
    (Stage.STORE, store_stage),
)
# What a routing dry run (`rules test`, `rules diff`) runs after `examine`: no claim, no
# duplicate check and nothing stored; its router only reads a round-robin cursor.
DRY_RUN_STAGES = tuple(
    (stage, run)
    for stage, run in DECIDING_STAGES
    if stage in (Stage.FOLLOW_UP, Stage.SUGGEST, Stage.ROUTE, Stage.DECIDE, Stage.ASSIGN)
)
STAGES: tuple[Stage, ...] = tuple(stage for stage, _ in (*EXAMINE_STAGES, *DECIDING_STAGES))


def examine(mail: IncomingMail, ctx: PipelineContext) -> None:
    """The stages that need no database."""
    for stage, run in EXAMINE_STAGES:
        with mail.in_stage(stage):
            run(mail, ctx)
