"""The queries the rest of the code uses, so SQL lives in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Row,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased, lazyload

from storage.models import (
    EMPTY_SHA256,
    AssignmentCursor,
    Attachment,
    AttachmentBlob,
    ImapCheckpoint,
    ImapLease,
    InboundMessage,
    InboundRaw,
    ProcessingAttempt,
    Ticket,
    TicketComment,
    TicketSuggestion,
    TriageModel,
    utcnow,
)
from storage.states import FINAL, PROCESSABLE, SETTLED, WITH_RECORD, Fate, Stage

RELEASED: dict[str, Any] = {"lease_owner": None, "lease_until": None, "interruptions": 0}
# The tables of the per-message statements (lease, claim, fate, the records stored), which
# are Core statements: the ORM's unit of work (a flush per object) and its ORM-enabled
# statement path (finding the updated rows in the session, among others) cost more CPU than
# running the statements on SQLite, and processing reads none of these rows back as objects.
_LEDGER = cast(Table, InboundMessage.__table__)
_RAW = cast(Table, InboundRaw.__table__)
_TICKETS = cast(Table, Ticket.__table__)
_COMMENTS = cast(Table, TicketComment.__table__)
_ATTACHMENTS = cast(Table, Attachment.__table__)
_BLOBS = cast(Table, AttachmentBlob.__table__)
_ATTEMPTS = cast(Table, ProcessingAttempt.__table__)
_CURSORS = cast(Table, AssignmentCursor.__table__)


def _rows_updated(session: Session, statement: Update) -> int:
    """How many rows an UPDATE matched."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


@dataclass(frozen=True)
class Lease:
    """A processing lease as read from the ledger row."""

    status: str
    owner: str | None
    until: datetime | None


def lease_of(session: Session, inbound_id: int) -> Lease | None:
    query = select(
        InboundMessage.status, InboundMessage.lease_owner, InboundMessage.lease_until
    ).where(InboundMessage.id == inbound_id)
    row = session.execute(query).one_or_none()
    return Lease(row.status, row.lease_owner, row.lease_until) if row else None


_INSERT_LEDGER = insert(InboundMessage).returning(InboundMessage.id, sort_by_parameter_order=True)
_INSERT_RAW = insert(InboundRaw)


def add_ledger_rows(session: Session, rows: list[dict[str, Any]], raws: list[bytes]) -> list[int]:
    """Insert ledger rows (column values) and their raw bytes; the new ids, in order. The
    statements are built once (the ORM's unit of work cost more CPU than the rest of accepting
    a message). On PostgreSQL each is one multi-row INSERT; on SQLite, whose RETURNING rows
    SQLAlchemy cannot match to their parameters, the ledger INSERT runs once per row."""
    ids = list(session.scalars(_INSERT_LEDGER, rows))
    stored = zip(ids, raws, strict=True)
    session.execute(_INSERT_RAW, [{"inbound_message_id": i, "raw": raw} for i, raw in stored])
    return ids


def _one_of(column: ColumnElement[str], values: Sequence[str], name: str) -> ColumnElement[bool]:
    """`column IN (values)` with one bound parameter per value, set when the statement is
    built: `in_` of a list makes an expanding parameter, whose SQL is rendered anew at every
    execution (about 50 microseconds, on each of the per-message statements)."""
    return column.in_([bindparam(f"{name}_{i}", value) for i, value in enumerate(values)])


# The per-message ledger statements, built once with bound parameters: building and hashing
# a statement (its cache key) for every message cost more CPU than running it on SQLite.
_TAKE_LEASE = (
    update(_LEDGER)
    .where(
        _LEDGER.c.id == bindparam("inbound_id"),
        _one_of(_LEDGER.c.status, PROCESSABLE, "processable"),
        _LEDGER.c.lease_owner.is_not_distinct_from(bindparam("seen_owner")),
        _LEDGER.c.lease_until.is_not_distinct_from(bindparam("seen_until")),
    )
    .values(
        attempts=_LEDGER.c.attempts + 1,
        interruptions=_LEDGER.c.interruptions + bindparam("left_behind"),
        lease_owner=bindparam("owner"),
        lease_until=bindparam("until"),
    )
    .returning(_LEDGER.c.attempts, _LEDGER.c.interruptions)
)
_CLAIM = (
    update(_LEDGER)
    .where(
        _LEDGER.c.id == bindparam("inbound_id"),
        _one_of(_LEDGER.c.status, PROCESSABLE, "processable"),
        _LEDGER.c.lease_owner == bindparam("owner"),
    )
    .values(attempts=_LEDGER.c.attempts)
)
_FIRST_RECORD = select(_LEDGER.c.id, _LEDGER.c.ticket_id).where(
    _LEDGER.c.dedupe_key == bindparam("dedupe_key"),
    _LEDGER.c.id != bindparam("before_id"),
    _one_of(_LEDGER.c.status, SETTLED, "settled"),
)
# What processing reads of a ledger row: its lease, whether it may be processed, and what
# makes an IncomingMail (`pipeline.process.incoming_mail`), with the raw bytes (one join).
_TO_PROCESS = (
    select(
        _LEDGER.c.id,
        _LEDGER.c.status,
        _LEDGER.c.fail_stage,
        _LEDGER.c.lease_owner,
        _LEDGER.c.lease_until,
        _LEDGER.c.source,
        _LEDGER.c.mail_from,
        _LEDGER.c.rcpt_to,
        _LEDGER.c.peer,
        _LEDGER.c.envelope,
        _LEDGER.c.received_at,
        _LEDGER.c.dedupe_key,
        _RAW.c.raw,
    )
    .select_from(_LEDGER.outerjoin(_RAW, _RAW.c.inbound_message_id == _LEDGER.c.id))
    .where(_LEDGER.c.id == bindparam("inbound_id"))
)


def row_to_process(session: Session, inbound_id: int) -> Row[Any] | None:
    """The columns of a ledger row that processing reads, with its raw bytes (`raw`, None if
    it has no bytes row); None if there is no such row."""
    row = session.execute(_TO_PROCESS, {"inbound_id": inbound_id}).one_or_none()
    return cast("Row[Any] | None", row)


def take_lease(
    session: Session, inbound_id: int, seen: Lease, owner: str, until: datetime
) -> tuple[int, int] | None:
    """Take the processing lease if it is still as `seen` (compare-and-set: of two processes,
    one wins). A lease left behind counts as an interrupted attempt. The caller commits at
    once, before the work starts. Returns (attempts, interruptions), or None if lost."""
    values = {"inbound_id": inbound_id, "seen_owner": seen.owner, "seen_until": seen.until}
    values |= {"left_behind": int(seen.owner is not None), "owner": owner, "until": until}
    row = session.execute(_TAKE_LEASE, values).one_or_none()
    return (row.attempts, row.interruptions) if row else None


def claim(session: Session, inbound_id: int, owner: str) -> bool:
    """Lock a message for the processing transaction; True while `owner` holds its lease.

    The UPDATE (which changes nothing) locks the row (PostgreSQL) or the database (SQLite) until
    commit, so the outcome is written by the lease holder alone, even if its lease ran out and
    another process took it meanwhile.
    """
    result = session.execute(_CLAIM, {"inbound_id": inbound_id, "owner": owner})
    return cast(CursorResult[Any], result).rowcount == 1


def mark_failed(
    session: Session,
    inbound_id: int,
    owner: str,
    stage: str,
    error: str,
    failed_at: datetime,
    stage_timings: list[dict[str, Any]] | None = None,
) -> int | None:
    """Record a failure by the lease holder `owner` and release the lease; returns the number
    of attempts so far, or None if the message is no longer this process's to fail."""
    result = session.execute(
        update(InboundMessage)
        .where(
            InboundMessage.id == inbound_id,
            InboundMessage.status.in_(PROCESSABLE),
            InboundMessage.lease_owner == owner,
        )
        .values(
            status=Fate.FAILED,
            fail_stage=stage,
            error=error,
            stage_timings=stage_timings,
            processed_at=failed_at,
            next_attempt_at=None,
            **RELEASED,
        )
        .returning(InboundMessage.attempts)
    )
    return result.scalar_one_or_none()


def schedule_retry(session: Session, inbound_id: int, at: datetime) -> None:
    session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id, InboundMessage.status == Fate.FAILED)
        .values(next_attempt_at=at)
    )


def pending_ids(session: Session, limit: int | None = None) -> Sequence[int]:
    """Messages received but not processed yet (new, or left over by a crash), oldest first."""
    query = (
        select(InboundMessage.id)
        .where(InboundMessage.status == Fate.RECEIVED)
        .order_by(InboundMessage.id)
        .limit(limit)
    )
    return session.scalars(query).all()


def first_record_of(
    session: Session, dedupe_key: str, before_id: int
) -> Row[int, int | None] | None:
    """The `id` and `ticket_id` (None for a drop) of an earlier delivery of the same message
    that was settled: it made a ticket or a comment, or was dropped."""
    rows = session.execute(_FIRST_RECORD, {"dedupe_key": dedupe_key, "before_id": before_id})
    # At most two rows (a key makes one ticket and one comment: `origin_key` is unique), so
    # the first is picked here; see ticket_for_message_ids for why not ORDER BY ... LIMIT 1.
    return min(rows.all(), key=lambda row: row.id, default=None)


_TICKET_FOR_MESSAGE_IDS = select(_LEDGER.c.id, _LEDGER.c.ticket_id).where(
    _LEDGER.c.message_id.in_(bindparam("message_ids", expanding=True)),
    _one_of(_LEDGER.c.status, WITH_RECORD, "with_record"),
)


def ticket_for_message_ids(session: Session, message_ids: Sequence[str]) -> int | None:
    """The ticket that the newest message with one of these Message-IDs made or commented on.

    Every matching row is read (about one per Message-ID, through the Message-ID index) and the
    newest is picked here: with `ORDER BY id DESC LIMIT 1` the database may instead walk the
    primary key backwards and read the ledger until it meets one, as PostgreSQL plans it.
    """
    if not message_ids:
        return None
    wanted = {"message_ids": list(dict.fromkeys(message_ids))}
    rows = session.execute(_TICKET_FOR_MESSAGE_IDS, wanted).all()
    newest = max(rows, key=lambda row: row.id, default=None)
    return newest.ticket_id if newest else None


def ticket_by_key(session: Session, key: str) -> Ticket | None:
    return session.scalars(select(Ticket).where(Ticket.key == key)).first()


def _dialect_insert(session: Session) -> Any:
    """The INSERT construct with ON CONFLICT support for the session's database."""
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _blob_upsert(dialect_insert: Any) -> Any:
    upsert = dialect_insert(_BLOBS).values(
        sha256=bindparam("blob_sha256"), size=bindparam("blob_size"), content=bindparam("blob")
    )
    return upsert.on_conflict_do_update(
        index_elements=["sha256"],
        set_={"content": upsert.excluded.content},
        where=func.length(_BLOBS.c.content) == 0,
    )


# Built once per dialect, as the ledger statements above.
_SAVE_BLOB = {"postgresql": _blob_upsert(pg_insert), "sqlite": _blob_upsert(sqlite_insert)}


def _per_dialect(session: Session, statements: dict[str, Any]) -> Any:
    """The statement of `statements` for the session's database (PostgreSQL, else SQLite)."""
    name = session.get_bind().dialect.name
    return statements["postgresql" if name == "postgresql" else "sqlite"]


def save_blob(session: Session, sha256: str, content: bytes) -> None:
    """Store attachment content once per sha256, safe against concurrent writers; content that
    retention emptied (`purge`) is put back when a new message brings the same bytes."""
    values = {"blob_sha256": sha256, "blob_size": len(content), "blob": content}
    session.execute(_per_dialect(session, _SAVE_BLOB), values)


_ADD_TICKET = insert(_TICKETS).returning(_TICKETS.c.id)
_SET_TICKET_KEY = (
    update(_TICKETS).where(_TICKETS.c.id == bindparam("ticket_id")).values(key=bindparam("new_key"))
)
_ADD_COMMENT = insert(_COMMENTS).returning(_COMMENTS.c.id)
_ADD_ATTACHMENT = insert(_ATTACHMENTS)


def add_ticket(session: Session, values: dict[str, Any], key: Callable[[int], str]) -> int:
    """Insert a ticket (`values`: its columns; the others take their defaults) and give it
    the key `key(id)` made of its id; returns the id."""
    ticket_id: int = session.execute(_ADD_TICKET, values).scalar_one()
    session.execute(_SET_TICKET_KEY, {"ticket_id": ticket_id, "new_key": key(ticket_id)})
    return ticket_id


def add_comment(session: Session, values: dict[str, Any]) -> int:
    """Insert a ticket comment (`values`: its columns); returns its id."""
    comment_id: int = session.execute(_ADD_COMMENT, values).scalar_one()
    return comment_id


def add_attachments(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert attachment rows (each: its columns), their blobs already saved."""
    if rows:
        session.execute(_ADD_ATTACHMENT, list(rows))


def set_fate(
    session: Session,
    inbound_id: int,
    status: Fate,
    *,
    ticket_id: int | None = None,
    duplicate_of_id: int | None = None,
    drop_reason: str | None = None,
    defects: list[str] | None = None,
    rule_hits: list[str] | None = None,
    rule_misses: list[str] | None = None,
    stage_timings: list[dict[str, Any]] | None = None,
) -> None:
    """Write a message's fate (with how long each stage took) and release its processing
    lease. The statement is built once (`_SET_FATE`): building it per message took a
    third of the time the processing transaction holds SQLite's write lock in its store stage."""
    params = {
        "inbound_id": inbound_id,
        "fate": status,
        "fate_ticket_id": ticket_id,
        "fate_duplicate_of_id": duplicate_of_id,
        "fate_drop_reason": drop_reason,
        "fate_defects": defects or [],
        "fate_rule_hits": rule_hits or [],
        "fate_rule_misses": rule_misses or [],
        "fate_stage_timings": stage_timings,
        "fate_processed_at": utcnow(),
    }
    session.execute(_SET_FATE, params)


_SET_FATE = (
    update(_LEDGER)
    .where(_LEDGER.c.id == bindparam("inbound_id"))
    .values(
        status=bindparam("fate"),
        ticket_id=bindparam("fate_ticket_id"),
        duplicate_of_id=bindparam("fate_duplicate_of_id"),
        drop_reason=bindparam("fate_drop_reason"),
        defects=bindparam("fate_defects"),
        rule_hits=bindparam("fate_rule_hits"),
        rule_misses=bindparam("fate_rule_misses"),
        stage_timings=bindparam("fate_stage_timings"),
        fail_stage=None,
        error=None,
        next_attempt_at=None,
        processed_at=bindparam("fate_processed_at"),
        **RELEASED,
    )
)


def ticket_statuses(session: Session) -> set[str]:
    """The statuses tickets have now (`open` when made; the tracker sets the others)."""
    return set(session.scalars(select(Ticket.status).distinct()).all())


def list_tickets(session: Session, limit: int = 50, status: str | None = None) -> Sequence[Ticket]:
    query = select(Ticket).order_by(Ticket.id.desc()).limit(limit)
    if status:
        query = query.where(Ticket.status == status)
    return session.scalars(query).all()


def list_messages(
    session: Session,
    limit: int = 50,
    status: str | None = None,
    since: datetime | None = None,
) -> Sequence[InboundMessage]:
    query = (
        select(InboundMessage)
        .options(lazyload(InboundMessage.content))  # a listing never needs the (large) bytes
        .order_by(InboundMessage.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(InboundMessage.status == status)
    if since:
        query = query.where(InboundMessage.received_at >= since)
    return session.scalars(query).all()


def message_by_id_or_message_id(session: Session, ref: str) -> InboundMessage | None:
    if ref.isdigit():
        return session.get(InboundMessage, int(ref))
    wanted = ref if ref.startswith("<") else f"<{ref}>"
    query = select(InboundMessage).where(InboundMessage.message_id == wanted)
    return session.scalars(query.order_by(InboundMessage.id).limit(1)).first()


def count_by_status(session: Session) -> dict[str, int]:
    query = select(InboundMessage.status, func.count()).group_by(InboundMessage.status)
    return {status: count for status, count in session.execute(query).all()}


def oldest_unprocessed_at(session: Session) -> datetime | None:
    """When the oldest message still `received` arrived (None without a backlog)."""
    query = (
        select(InboundMessage.received_at)
        .where(InboundMessage.status == Fate.RECEIVED)
        .order_by(InboundMessage.id)
        .limit(1)
    )
    return session.scalar(query)


def retries_scheduled(session: Session) -> int:
    """Failed messages waiting for their automatic retry."""
    query = select(func.count()).where(
        InboundMessage.status == Fate.FAILED, InboundMessage.next_attempt_at.is_not(None)
    )
    return session.scalar(query) or 0


def ping(session: Session) -> None:
    """A round trip to the database: raises if it cannot be reached."""
    session.execute(text("SELECT 1"))


def attachments_of_ticket(session: Session, ticket_id: int) -> Sequence[Attachment]:
    """The attachments of a ticket and of its comments, in the order they arrived."""
    query = (
        select(Attachment)
        .outerjoin(TicketComment, Attachment.comment_id == TicketComment.id)
        .where(or_(Attachment.ticket_id == ticket_id, TicketComment.ticket_id == ticket_id))
        .order_by(Attachment.id)
    )
    return session.scalars(query).all()


def attachment_content(session: Session, attachment_id: int) -> tuple[Attachment, bytes] | None:
    """An attachment and its content, or None if there is no such attachment."""
    query = (
        select(Attachment, AttachmentBlob.content)
        .join(AttachmentBlob, AttachmentBlob.sha256 == Attachment.sha256)
        .where(Attachment.id == attachment_id)
    )
    row = session.execute(query).first()
    return (row[0], bytes(row[1])) if row else None


# --- failed messages: history, selection for replay, automatic retry, discard ---------------


_ADD_ATTEMPT = insert(_ATTEMPTS)


def add_attempt(
    session: Session,
    inbound_id: int,
    outcome: str,
    *,
    stage: str | None,
    error: str | None,
    host: str,
    pid: int,
    username: str | None,
    command: str,
) -> None:
    """Append one entry to a message's processing history."""
    values = {"inbound_message_id": inbound_id, "attempted_at": utcnow(), "outcome": outcome}
    values |= {"stage": stage, "error": error, "host": host, "pid": pid}
    session.execute(_ADD_ATTEMPT, values | {"username": username, "command": command})


def attempts_of(session: Session, inbound_id: int) -> Sequence[ProcessingAttempt]:
    query = (
        select(ProcessingAttempt)
        .where(ProcessingAttempt.inbound_message_id == inbound_id)
        .order_by(ProcessingAttempt.id)
    )
    return session.scalars(query).all()


@dataclass(frozen=True)
class FailedFilter:
    """Which failed messages an admin means; every given field must match."""

    since: datetime | None = None  # received at or after
    stage: str | None = None
    error: str | None = None  # case-insensitive substring of the error text
    source: str | None = None


def _failed_where(wanted: FailedFilter) -> list:
    conditions = [InboundMessage.status == Fate.FAILED]
    if wanted.since:
        conditions.append(InboundMessage.received_at >= wanted.since)
    if wanted.stage:
        conditions.append(InboundMessage.fail_stage == wanted.stage)
    if wanted.error:
        conditions.append(InboundMessage.error.icontains(wanted.error, autoescape=True))
    if wanted.source:
        conditions.append(InboundMessage.source == wanted.source)
    return conditions


def failed_ids(session: Session, wanted: FailedFilter) -> Sequence[int]:
    """Failed messages matching `wanted`, oldest first (the order a replay takes)."""
    query = select(InboundMessage.id).where(*_failed_where(wanted)).order_by(InboundMessage.id)
    return session.scalars(query).all()


def failed_with_head(
    session: Session, wanted: FailedFilter, limit: int, head_bytes: int
) -> Sequence[tuple[InboundMessage, bytes]]:
    """Failed messages, newest first, each with only the first `head_bytes` of its raw bytes
    (enough for the headers; a failed message may be a huge one)."""
    head = func.substr(InboundRaw.raw, 1, head_bytes)
    query = (
        select(InboundMessage, head)
        .outerjoin(InboundRaw, InboundRaw.inbound_message_id == InboundMessage.id)
        .options(lazyload(InboundMessage.content))
        .where(*_failed_where(wanted))
        .order_by(InboundMessage.id.desc())
        .limit(limit)
    )
    return [(message, bytes(raw_head or b"")) for message, raw_head in session.execute(query)]


def due_for_retry(session: Session, now: datetime, limit: int) -> Sequence[int]:
    """Failed messages whose automatic retry is due, longest due first.

    In the order of the (status, next_attempt_at) index, so the first `limit` due ones are read
    and no more, however many failures wait for a human."""
    query = (
        select(InboundMessage.id)
        .where(
            InboundMessage.status == Fate.FAILED,
            InboundMessage.next_attempt_at <= now,
        )
        .order_by(InboundMessage.next_attempt_at, InboundMessage.id)
        .limit(limit)
    )
    return session.scalars(query).all()


def statuses_of(session: Session, ids: Sequence[int]) -> dict[int, str]:
    """The status of each of `ids` that exists in the ledger."""
    if not ids:
        return {}
    query = select(InboundMessage.id, InboundMessage.status).where(InboundMessage.id.in_(ids))
    return {inbound_id: status for inbound_id, status in session.execute(query)}


def discard(session: Session, inbound_id: int, reason: str) -> bool:
    """Mark a failed message handled without processing; False if it is not failed (any more)."""
    statement = (
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id, InboundMessage.status == Fate.FAILED)
        .values(
            status=Fate.DISCARDED,
            discard_reason=reason,
            next_attempt_at=None,
            processed_at=utcnow(),
            **RELEASED,
        )
    )
    return _rows_updated(session, statement) == 1


# --- IMAP fetch checkpoints and messages that could not be fetched ---------------------------


def imap_checkpoint(session: Session, account: str, folder: str) -> tuple[int, int] | None:
    """(UIDVALIDITY, last fetched UID) of an account's folder, or None before the first fetch."""
    row = session.get(ImapCheckpoint, (account, folder))
    return (row.uidvalidity, row.last_uid) if row else None


def save_imap_checkpoint(
    session: Session, account: str, folder: str, uidvalidity: int, last_uid: int
) -> None:
    values = {"uidvalidity": uidvalidity, "last_uid": last_uid, "updated_at": utcnow()}
    session.execute(
        _dialect_insert(session)(ImapCheckpoint)
        .values(account=account, folder=folder, **values)
        .on_conflict_do_update(index_elements=["account", "folder"], set_=values)
    )


def is_unfetched(session: Session, inbound_id: int) -> bool:
    """A failed message whose bytes were never fetched (see `add_unfetched`)."""
    query = select(InboundMessage.id).where(
        InboundMessage.id == inbound_id,
        InboundMessage.status == Fate.FAILED,
        InboundMessage.fail_stage == Stage.FETCH,
    )
    return session.execute(query).first() is not None


def add_unfetched(
    session: Session,
    *,
    source: str,
    size: int,
    message_id: str | None,
    dedupe_key: str,
    envelope: dict[str, Any],
    error: str,
) -> int:
    """A ledger row, status failed at stage `fetch`, for a message whose bytes we do not have
    (too large, or the server would not return it); `raw` is empty, `size` the announced one."""
    row = InboundMessage(
        source=source,
        raw=b"",
        size=size,
        sha256=EMPTY_SHA256,
        message_id=message_id,
        dedupe_key=dedupe_key,
        envelope=envelope,
        status=Fate.FAILED,
        fail_stage=Stage.FETCH,
        error=error,
        processed_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row.id


def _cursor_upsert(dialect_insert: Any) -> Any:
    now = bindparam("now", type_=_CURSORS.c.updated_at.type)
    return (
        dialect_insert(_CURSORS)
        .values(team=bindparam("team"), position=1, updated_at=now)
        .on_conflict_do_update(
            index_elements=["team"],
            set_={"position": _CURSORS.c.position + 1, "updated_at": now},
        )
        .returning(_CURSORS.c.position)
    )


_ADVANCE_CURSOR = {"postgresql": _cursor_upsert(pg_insert), "sqlite": _cursor_upsert(sqlite_insert)}


def advance_assignment_cursor(session: Session, team: str) -> int:
    """Take the next round-robin turn (1, 2, 3, ...) of `team` in the caller's transaction.

    One atomic upsert, so two processes never get the same turn: PostgreSQL locks the cursor
    row until the caller commits (the other waits, then increments the committed value), and
    SQLite locks the database. A rolled-back routing gives its turn back.
    """
    statement = _per_dialect(session, _ADVANCE_CURSOR)
    position: int = session.execute(statement, {"team": team, "now": utcnow()}).scalar_one()
    return position


def peek_assignment_cursor(session: Session, team: str) -> int:
    """The last turn taken for `team` (0 if none), without taking one: for dry runs."""
    query = select(AssignmentCursor.position).where(AssignmentCursor.team == team)
    return session.scalars(query).first() or 0


def open_ticket_counts(session: Session, assignees: Sequence[str]) -> dict[str, int]:
    """Open tickets per assignee, for the `least_open` strategy (absent: none open)."""
    query = (
        select(Ticket.assignee, func.count())
        .where(Ticket.status == "open", Ticket.assignee.in_(assignees))
        .group_by(Ticket.assignee)
    )
    return {a: count for a, count in session.execute(query).all() if a is not None}


def routed_since(session: Session, since: datetime) -> Sequence[tuple[int, str | None]]:
    """(ledger id, key of the ticket it opened) of messages received since `since` that were
    routed (ticket, comment, dropped) or failed, oldest first: what `rules diff` replays (not
    those whose raw bytes `purge` dropped)."""
    routed = (*WITH_RECORD, Fate.DROPPED, Fate.FAILED)
    raw_kept = or_(func.length(InboundRaw.raw) > 0, InboundMessage.sha256 == EMPTY_SHA256)
    query = (
        select(InboundMessage.id, Ticket.key)
        .join(InboundRaw, InboundRaw.inbound_message_id == InboundMessage.id)
        .outerjoin(Ticket, Ticket.inbound_message_id == InboundMessage.id)
        .where(InboundMessage.received_at >= since, InboundMessage.status.in_(routed), raw_kept)
        .order_by(InboundMessage.id)
    )
    return [(inbound_id, key) for inbound_id, key in session.execute(query).all()]


# --- operations: `status`, `stats` and retention (`purge`) ------------------------------------


def failures_by_stage(session: Session) -> dict[str, int]:
    query = (
        select(InboundMessage.fail_stage, func.count())
        .where(InboundMessage.status == Fate.FAILED)
        .group_by(InboundMessage.fail_stage)
    )
    return {stage or "?": count for stage, count in session.execute(query).all()}


def retries_due(session: Session, now: datetime) -> int:
    """Failed messages whose automatic retry time has come (the index on status, time)."""
    query = select(func.count()).where(
        InboundMessage.status == Fate.FAILED, InboundMessage.next_attempt_at <= now
    )
    return session.scalar(query) or 0


def last_received_by_source(session: Session) -> Sequence[Row[int, str, datetime, str | None]]:
    """(id, source, received_at, message_id) of the newest message of each source."""
    newest = select(func.max(InboundMessage.id)).group_by(InboundMessage.source)
    query = (
        select(
            InboundMessage.id,
            InboundMessage.source,
            InboundMessage.received_at,
            InboundMessage.message_id,
        )
        .where(InboundMessage.id.in_(newest))
        .order_by(InboundMessage.source)
    )
    return session.execute(query).all()


def imap_checkpoints(session: Session) -> Sequence[ImapCheckpoint]:
    query = select(ImapCheckpoint).order_by(ImapCheckpoint.account, ImapCheckpoint.folder)
    return session.scalars(query).all()


def last_ticket(session: Session) -> Ticket | None:
    return session.scalars(select(Ticket).order_by(Ticket.id.desc()).limit(1)).first()


def received_since_by(session: Session, column: str, since: datetime) -> dict[str, int]:
    """Messages received since `since`, counted by a ledger column (`source`, `status`)."""
    grouped = getattr(InboundMessage, column)
    query = (
        select(grouped, func.count()).where(InboundMessage.received_at >= since).group_by(grouped)
    )
    return {value: count for value, count in session.execute(query).all()}


def tickets_since_by(session: Session, column: str, since: datetime) -> dict[str | None, int]:
    """Tickets made since `since`, counted by a ticket column (`category`, `assignee`)."""
    grouped = getattr(Ticket, column)
    query = select(grouped, func.count()).where(Ticket.created_at >= since).group_by(grouped)
    return {value: count for value, count in session.execute(query).all()}


def _final_before(before: datetime) -> ColumnElement[bool]:
    """Ledger rows whose fate is final and that were received before `before`."""
    return and_(InboundMessage.status.in_(FINAL), InboundMessage.received_at < before)


def raw_to_purge(session: Session, before: datetime) -> Sequence[Row[int, int]]:
    """(ledger id, bytes) of the raw messages `purge` would empty, oldest first."""
    stored = func.length(InboundRaw.raw)
    query = (
        select(InboundRaw.inbound_message_id, stored)
        .join(InboundMessage, InboundMessage.id == InboundRaw.inbound_message_id)
        .where(_final_before(before), stored > 0)
        .order_by(InboundRaw.inbound_message_id)
    )
    return session.execute(query).all()


def blobs_to_purge(session: Session, before: datetime) -> Sequence[Row[str, int]]:
    """(sha256, bytes) of attachment contents that only messages `purge` empties refer to: a
    blob one other message (newer, failed, unprocessed) shares keeps its content."""
    stored = func.length(AttachmentBlob.content)
    query = (
        select(AttachmentBlob.sha256, stored)
        .where(
            stored > 0,
            select(Attachment.id).where(Attachment.sha256 == AttachmentBlob.sha256).exists(),
            ~_blob_still_needed(before),
        )
        .order_by(AttachmentBlob.sha256)
    )
    return session.execute(query).all()


def purge_raw(session: Session, ids: Sequence[int]) -> int:
    """Empty the raw bytes of these (final) messages; the ledger row keeps sha256 and size."""
    statement = (
        update(InboundRaw)
        .where(InboundRaw.inbound_message_id.in_(ids))
        .where(
            select(InboundMessage.id)
            .where(InboundMessage.id == InboundRaw.inbound_message_id)
            .where(InboundMessage.status.in_(FINAL))
            .exists()
        )
        .values(raw=b"")
    )
    return _rows_updated(session, statement)


def _blob_still_needed(before: datetime) -> ColumnElement[bool]:
    """A message that keeps its bytes (newer than `before`, or not final) uses the blob."""
    other = aliased(InboundMessage)
    return (
        select(Attachment.id)
        .join(other, other.id == Attachment.inbound_message_id)
        .where(
            Attachment.sha256 == AttachmentBlob.sha256,
            or_(other.status.not_in(FINAL), other.received_at >= before),
        )
        .exists()
    )


def purge_blobs(session: Session, digests: Sequence[str], before: datetime) -> int:
    """Empty these attachment contents, unless a message stored since they were chosen needs
    them; the blob keeps its sha256 and size."""
    statement = (
        update(AttachmentBlob)
        .where(AttachmentBlob.sha256.in_(digests), ~_blob_still_needed(before))
        .values(content=b"")
    )
    return _rows_updated(session, statement)


# --- the web pages: the ledger with headers, per-message attachments, hourly fates -----------


@dataclass(frozen=True)
class LedgerFilter:
    """Which ledger rows the web ledger shows; every given field must match."""

    status: str | None = None
    source: str | None = None
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before


def ledger_with_head(
    session: Session, wanted: LedgerFilter, limit: int, head_bytes: int, before_id: int | None
) -> Sequence[tuple[InboundMessage, bytes, str | None]]:
    """Ledger rows, newest first (below `before_id` when given), each with the first
    `head_bytes` of its raw bytes (for From and Subject) and the key of its ticket."""
    head = func.substr(InboundRaw.raw, 1, head_bytes)
    query = (
        select(InboundMessage, head, Ticket.key)
        .outerjoin(InboundRaw, InboundRaw.inbound_message_id == InboundMessage.id)
        .outerjoin(Ticket, Ticket.id == InboundMessage.ticket_id)
        .options(lazyload(InboundMessage.content))
        .order_by(InboundMessage.id.desc())
        .limit(limit)
    )
    conditions = {
        InboundMessage.status: wanted.status,
        InboundMessage.source: wanted.source,
    }
    for column, value in conditions.items():
        if value:
            query = query.where(column == value)
    if wanted.since:
        query = query.where(InboundMessage.received_at >= wanted.since)
    if wanted.until:
        query = query.where(InboundMessage.received_at < wanted.until)
    if before_id is not None:
        query = query.where(InboundMessage.id < before_id)
    return [(m, bytes(raw_head or b""), key) for m, raw_head, key in session.execute(query)]


def attachments_of_message(session: Session, inbound_id: int) -> Sequence[Attachment]:
    query = (
        select(Attachment)
        .where(Attachment.inbound_message_id == inbound_id)
        .order_by(Attachment.id)
    )
    return session.scalars(query).all()


def fates_per_hour(session: Session, since: datetime) -> list[tuple[datetime, str, int]]:
    """(UTC hour, fate, messages received in it) since `since`, counted by the database."""
    if session.get_bind().dialect.name == "postgresql":
        hour: Any = func.date_trunc("hour", func.timezone("UTC", InboundMessage.received_at))
    else:  # SQLite keeps UTC text
        hour = func.strftime("%Y-%m-%d %H:00:00", InboundMessage.received_at)
    query = (
        select(hour, InboundMessage.status, func.count())
        .where(InboundMessage.received_at >= since)
        .group_by(hour, InboundMessage.status)
    )
    rows = []
    for bucket, status, count in session.execute(query).all():
        moment = bucket if isinstance(bucket, datetime) else datetime.fromisoformat(bucket)
        rows.append((moment.replace(tzinfo=UTC), status, count))
    return rows


# --- triage (triage/): training tickets, stored models, suggestions ------------------------------


@dataclass(frozen=True)
class LabelledTicket:
    """What the triage model learns from: a ticket's text and its current labels."""

    id: int
    created_at: datetime
    subject: str
    body: str
    source_kind: str
    fields: dict[str, Any]
    category: str
    assignee: str | None
    inbound_message_id: int


def labelled_tickets(session: Session, since: datetime | None = None) -> list[LabelledTicket]:
    """Tickets with a category, oldest first (time order is what the hold-out splits on)."""
    query = (
        select(
            Ticket.id,
            Ticket.created_at,
            Ticket.subject,
            Ticket.body,
            Ticket.source_kind,
            Ticket.fields,
            Ticket.category,
            Ticket.assignee,
            Ticket.inbound_message_id,
        )
        .where(Ticket.category.is_not(None))
        .order_by(Ticket.created_at, Ticket.id)
    )
    if since is not None:
        query = query.where(Ticket.created_at >= since)
    return [LabelledTicket(*row) for row in session.execute(query).all()]


def raw_of(session: Session, inbound_id: int) -> bytes:
    return session.scalars(
        select(InboundRaw.raw).where(InboundRaw.inbound_message_id == inbound_id)
    ).one()


def add_triage_model(session: Session, model: TriageModel) -> int:
    """Store a trained model as the next version; returns the version."""
    newest = session.scalar(select(func.max(TriageModel.version))) or 0
    model.version = newest + 1
    session.add(model)
    session.flush()
    return model.version


_MODELS = cast(Table, TriageModel.__table__)
_NEWEST_MODEL = (
    select(_MODELS.c.version, _MODELS.c.sha256).order_by(_MODELS.c.version.desc()).limit(1)
)


def newest_triage_model(session: Session) -> tuple[int, str] | None:
    """(version, sha256) of the newest model, without its bytes: asked once per message (its
    statement built once, as the ledger's)."""
    row = session.execute(_NEWEST_MODEL).first()
    return (row.version, row.sha256) if row else None


def triage_model_bytes(session: Session, version: int) -> bytes:
    return session.scalars(select(TriageModel.model).where(TriageModel.version == version)).one()


def save_suggestion(session: Session, suggestion: TicketSuggestion) -> None:
    session.add(suggestion)


def suggestion_of(session: Session, ticket_id: int) -> TicketSuggestion | None:
    return session.get(TicketSuggestion, ticket_id)


# --- several nodes on one store: claiming rows, IMAP folder leases, ticket notifications -----

TICKETS_CHANNEL = "mailintake_tickets"


def _lease_candidates(which: ColumnElement[bool]) -> Select[Any]:
    return (
        select(_LEDGER.c.id, _LEDGER.c.status, _LEDGER.c.lease_owner, _LEDGER.c.lease_until)
        .where(_LEDGER.c.status == Fate.RECEIVED, which)
        .order_by(_LEDGER.c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
    )


# Built once, as the per-message statements above: a worker asks for every message it claims.
_FREE_CANDIDATES = _lease_candidates(
    or_(_LEDGER.c.lease_owner.is_(None), _LEDGER.c.lease_until <= bindparam("now"))
)
_HELD_CANDIDATES = _lease_candidates(
    _LEDGER.c.lease_owner.like(bindparam("owner_prefix"), escape="/")
    & (_LEDGER.c.lease_until > bindparam("now"))
)


def lease_candidates(
    session: Session, now: datetime, limit: int, held_on: str | None = None
) -> list[tuple[int, Lease]]:
    """Messages waiting (`received`), oldest first, whose lease is free or has run out; with
    `held_on` (a `host:` prefix) instead those whose current lease a process of that host holds
    (it may have died). On PostgreSQL the rows are locked `FOR UPDATE SKIP LOCKED` until the
    caller commits, so concurrent callers get disjoint rows (SQLite has no row locks; the
    compare-and-set of `take_lease` settles a race there)."""
    if held_on is None:
        rows = session.execute(_FREE_CANDIDATES, {"now": now, "limit": limit})
    else:
        prefix = held_on.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"
        rows = session.execute(
            _HELD_CANDIDATES, {"now": now, "limit": limit, "owner_prefix": prefix}
        )
    return [(row.id, Lease(row.status, row.lease_owner, row.lease_until)) for row in rows]


def imap_lease_of(session: Session, account: str, folder: str) -> Lease | None:
    """An IMAP folder's lease (its `status` is unused: ''), or None before its first holder."""
    row = session.get(ImapLease, (account, folder))
    return Lease("", row.owner, row.until) if row else None


def take_imap_lease(
    session: Session,
    account: str,
    folder: str,
    seen: Lease | None,
    owner: str,
    now: datetime,
    until: datetime,
) -> bool:
    """Take an IMAP folder's lease if it is still as `seen` (compare-and-set); False if lost."""
    values = {"owner": owner, "until": until, "taken_at": now}
    if seen is None:
        statement = (
            _dialect_insert(session)(ImapLease)
            .values(account=account, folder=folder, **values)
            .on_conflict_do_nothing(index_elements=["account", "folder"])
            .returning(ImapLease.owner)
        )
        return session.execute(statement).first() is not None
    if seen.owner == owner:
        values.pop("taken_at")  # still ours: the same tenure goes on
    return (
        _rows_updated(
            session,
            update(ImapLease)
            .where(
                ImapLease.account == account,
                ImapLease.folder == folder,
                ImapLease.owner.is_not_distinct_from(seen.owner),
                ImapLease.until.is_not_distinct_from(seen.until),
            )
            .values(**values),
        )
        == 1
    )


def renew_imap_lease(
    session: Session, account: str, folder: str, owner: str, until: datetime
) -> bool:
    """Extend `owner`'s lease of a folder to `until`; False if it is not `owner`'s any more."""
    statement = (
        update(ImapLease)
        .where(ImapLease.account == account, ImapLease.folder == folder, ImapLease.owner == owner)
        .values(until=until)
    )
    return _rows_updated(session, statement) == 1


def release_imap_lease(session: Session, account: str, folder: str, owner: str) -> None:
    session.execute(
        update(ImapLease)
        .where(ImapLease.account == account, ImapLease.folder == folder, ImapLease.owner == owner)
        .values(owner=None, until=None)
    )


def holds_imap_lease(session: Session, account: str, folder: str, owner: str) -> bool:
    """Whether `owner` holds the folder's lease, locking the lease row (PostgreSQL) until the
    caller commits: a checkpoint is saved only by the holder (a node that lost the lease while
    it fetched must not move the checkpoint under the new holder)."""
    query = (
        select(ImapLease.owner)
        .where(ImapLease.account == account, ImapLease.folder == folder)
        .with_for_update()
    )
    return session.scalar(query) == owner


def notify_ticket(session: Session, ticket_id: int) -> None:
    """`NOTIFY mailintake_tickets, '<ticket key>'` (PostgreSQL; nothing on SQLite), in the
    caller's transaction: listeners hear of a new ticket or comment when it is committed, and
    never of one rolled back."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.flush()
    session.execute(
        select(func.pg_notify(TICKETS_CHANNEL, Ticket.key)).where(Ticket.id == ticket_id)
    )
