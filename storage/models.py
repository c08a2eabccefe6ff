"""The database schema. It is a public interface: keep docs/schema.md in step, change it only
through an Alembic migration in storage/migrations/versions/."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.states import Fate


def utcnow() -> datetime:
    return datetime.now(UTC)


def waited_seconds(since: datetime | None, now: datetime | None = None) -> float:
    """Seconds from `since` to `now` (default: this moment), never negative; 0 without `since`
    (the backlog's age, for `/metrics`, `/readyz` and `mailintake status` alike)."""
    if since is None:
        return 0.0
    return max(0.0, ((now or utcnow()) - since).total_seconds())


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def purged(sha256: str, content: bytes) -> bool:
    """Whether stored bytes were emptied by `mailintake purge`: they no longer match their
    recorded hash (a message that was empty, or never fetched, records the hash of nothing)."""
    return not content and sha256 != EMPTY_SHA256


class ClippedString(TypeDecorator[str]):
    """A VARCHAR for text that comes from mail (names, addresses, Message-IDs): longer values are
    cut to fit, since PostgreSQL would refuse them and a mail must never fail on a long name."""

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return value[: self.length] if value is not None else value


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: it is UTC there)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


# Other tools read the ledger as `inbound_messages` (docs/schema.md): since migration 0005 that
# name is a read-only view joining the two tables below, with the columns the table had.


class InboundMessage(Base):
    """The ledger: one row per received message, committed before the sender gets its ack.

    This row is the one that changes (lease, claim, fate), so it holds no large value: the raw
    bytes are in `inbound_raw` (`InboundRaw`), written once with the row and never updated, and
    an update here rewrites a few hundred bytes whatever the size of the mail. `raw` reads and
    sets them; loading a whole InboundMessage loads them with it (one join on the primary key),
    the ledger queries in storage.repo select columns and never touch them.
    """

    __tablename__ = "inbound_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    source: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    message_id: Mapped[str | None] = mapped_column(ClippedString(998))
    dedupe_key: Mapped[str] = mapped_column(String(998))
    mail_from: Mapped[str | None] = mapped_column(ClippedString(998))
    rcpt_to: Mapped[list[str]] = mapped_column(default=list)
    peer: Mapped[str | None] = mapped_column(ClippedString(255))
    envelope: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=Fate.RECEIVED)
    fail_stage: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    processed_at: Mapped[datetime | None]
    drop_reason: Mapped[str | None] = mapped_column(Text)
    defects: Mapped[list[str]] = mapped_column(default=list)
    # The routing rules that matched (and applied) and those tried that did not, for every fate
    # that was routed: a dropped mail names the rule that dropped it.
    rule_hits: Mapped[list[str]] = mapped_column(default=list, server_default="[]")
    rule_misses: Mapped[list[str]] = mapped_column(default=list, server_default="[]")
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_ledger.id"), index=True)
    next_attempt_at: Mapped[datetime | None]  # when a transient failure is retried by itself
    discard_reason: Mapped[str | None] = mapped_column(Text)
    # The process working on the message (`host:pid`) and until when; left behind by a
    # process that died mid-way. `interruptions` counts such unfinished attempts in a row.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None]
    interruptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # How long each stage took when the fate was stored: [{"stage", "ms", "failed"?}, ...] in
    # stage order; NULL for rows processed before migration 0008.
    stage_timings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    content: Mapped[InboundRaw] = relationship(lazy="joined")

    # One index per lookup of the per-message path (tests/test_query_plans.py checks the plans):
    # a reply's In-Reply-To/References and a re-delivery's dedupe key are looked up among the
    # rows that made a record, new work and due retries by status.
    __table_args__ = (
        Index("ix_inbound_ledger_message_id_status", "message_id", "status"),
        Index("ix_inbound_ledger_dedupe_key_status", "dedupe_key", "status"),
        Index("ix_inbound_ledger_status_id", "status", "id"),
        Index("ix_inbound_ledger_status_next_attempt_at", "status", "next_attempt_at"),
    )

    @property
    def raw(self) -> bytes:
        """The exact bytes received, never modified."""
        return self.content.raw

    @raw.setter
    def raw(self, value: bytes) -> None:
        if self.content is None:
            self.content = InboundRaw(raw=value)
        else:
            self.content.raw = value

    @property
    def raw_purged(self) -> bool:
        """The raw bytes were dropped by retention (`mailintake purge`); row, sha256, size stay."""
        return purged(self.sha256, self.raw)


class InboundRaw(Base):
    """The raw bytes of a ledger row, apart from the row that status updates rewrite."""

    __tablename__ = "inbound_raw"

    inbound_message_id: Mapped[int] = mapped_column(
        ForeignKey("inbound_ledger.id"), primary_key=True
    )
    raw: Mapped[bytes] = mapped_column(LargeBinary)


class Ticket(Base):
    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    source_kind: Mapped[str] = mapped_column(String(16))
    category: Mapped[str | None] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text, default="")
    body_html: Mapped[str | None] = mapped_column(Text)
    requester_name: Mapped[str | None] = mapped_column(ClippedString(255))
    requester_email: Mapped[str | None] = mapped_column(ClippedString(320), index=True)
    requester_phone: Mapped[str | None] = mapped_column(ClippedString(64))
    requester_company: Mapped[str | None] = mapped_column(ClippedString(255))
    assignee: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    due_at: Mapped[datetime | None]
    labels: Mapped[list[str]] = mapped_column(default=list)
    fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rule_names: Mapped[list[str]] = mapped_column(default=list)
    rules_version: Mapped[str | None] = mapped_column(String(64))
    inbound_message_id: Mapped[int] = mapped_column(
        ForeignKey("inbound_ledger.id", use_alter=True, name="fk_tickets_inbound_message_id"),
        unique=True,
    )
    origin_key: Mapped[str] = mapped_column(String(998), unique=True)
    summary: Mapped[str | None] = mapped_column(ClippedString(80))  # one line for lists (0007)

    comments: Mapped[list[TicketComment]] = relationship(
        back_populates="ticket", order_by="TicketComment.id"
    )

    # `least_open` counts open tickets per assignee from this index alone.
    __table_args__ = (Index("ix_tickets_assignee_status", "assignee", "status"),)


class TicketComment(Base):
    __tablename__ = "ticket_comments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    author_name: Mapped[str | None] = mapped_column(ClippedString(255))
    author_email: Mapped[str | None] = mapped_column(ClippedString(320))
    body: Mapped[str] = mapped_column(Text, default="")
    body_full: Mapped[str] = mapped_column(Text, default="")
    inbound_message_id: Mapped[int] = mapped_column(ForeignKey("inbound_ledger.id"), unique=True)
    origin_key: Mapped[str] = mapped_column(String(998), unique=True)

    ticket: Mapped[Ticket] = relationship(back_populates="comments")


class AttachmentBlob(Base):
    """Attachment content, stored once per sha256."""

    __tablename__ = "attachment_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class Attachment(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inbound_message_id: Mapped[int] = mapped_column(ForeignKey("inbound_ledger.id"), index=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    comment_id: Mapped[int | None] = mapped_column(ForeignKey("ticket_comments.id"), index=True)
    filename: Mapped[str] = mapped_column(ClippedString(255))
    original_filename: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(ClippedString(255))
    content_id: Mapped[str | None] = mapped_column(ClippedString(998))
    inline: Mapped[bool] = mapped_column(default=False)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(ForeignKey("attachment_blobs.sha256"), index=True)


class ImapCheckpoint(Base):
    """How far each IMAP account/folder has been fetched (UIDVALIDITY and last UID)."""

    __tablename__ = "imap_checkpoints"

    account: Mapped[str] = mapped_column(String(128), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ImapLease(Base):
    """Which node fetches an IMAP account's folder: one at a time, renewed by heartbeats; a
    lease that runs out (its holder stopped renewing) is taken over by another node."""

    __tablename__ = "imap_leases"

    account: Mapped[str] = mapped_column(String(128), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(255))  # `host:pid:thread:boot.start`
    until: Mapped[datetime | None]
    taken_at: Mapped[datetime | None]  # when the current (or last) holder took it


class AssignmentCursor(Base):
    """Round-robin position per team, shared by every process using the database."""

    __tablename__ = "assignment_cursors"

    team: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ProcessingAttempt(Base):
    """The history of a ledger row: every processing run (first delivery, replay, automatic
    retry) and every discard, with who did it."""

    __tablename__ = "processing_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inbound_message_id: Mapped[int] = mapped_column(ForeignKey("inbound_ledger.id"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))  # a Fate value
    stage: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str] = mapped_column(ClippedString(255))
    pid: Mapped[int] = mapped_column(Integer)
    username: Mapped[str | None] = mapped_column(ClippedString(64))
    command: Mapped[str] = mapped_column(ClippedString(255))


class TriageModel(Base):
    """A trained triage model (triage/): every node loads the newest, by `version`. `model` is
    a pickle, loaded only when its sha256 matches: only models the store itself trained."""

    __tablename__ = "triage_models"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    trained_at: Mapped[datetime] = mapped_column(default=utcnow)
    trained_on: Mapped[int] = mapped_column(Integer)  # how many tickets
    since: Mapped[datetime | None]  # the oldest ticket it could learn from
    sha256: Mapped[str] = mapped_column(String(64))
    model: Mapped[bytes] = mapped_column(LargeBinary)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # classes, library versions


class TicketSuggestion(Base):
    """What the triage model suggested for a ticket when it was made; the rules decided the
    ticket's own columns."""

    __tablename__ = "ticket_suggestions"

    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), primary_key=True)
    category: Mapped[str] = mapped_column(String(64))
    category_probability: Mapped[float] = mapped_column(Float)
    assignee: Mapped[str | None] = mapped_column(String(64))
    assignee_probability: Mapped[float] = mapped_column(Float)
    model_version: Mapped[int] = mapped_column(ForeignKey("triage_models.version"))
    reason: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
