"""The queries the rest of the code uses, so SQL lives in one place."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage.models import (
    Attachment,
    AttachmentBlob,
    InboundMessage,
    MessageStatus,
    Ticket,
    utcnow,
)

PROCESSABLE = (MessageStatus.RECEIVED, MessageStatus.FAILED)
DONE_WITH_RECORD = (MessageStatus.TICKET, MessageStatus.COMMENT)


def claim(session: Session, inbound_id: int) -> bool:
    """Take a message for processing inside the caller's transaction.

    The UPDATE locks the row (PostgreSQL) or the database (SQLite) until commit, so of two
    processes claiming one message the second waits, then finds it no longer processable.
    """
    result = session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id, InboundMessage.status.in_(PROCESSABLE))
        .values(attempts=InboundMessage.attempts + 1)
    )
    return result.rowcount == 1


def mark_failed(session: Session, inbound_id: int, stage: str, error: str) -> None:
    session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id, InboundMessage.status.in_(PROCESSABLE))
        .values(
            status=MessageStatus.FAILED,
            fail_stage=stage,
            error=error,
            attempts=InboundMessage.attempts + 1,
            processed_at=utcnow(),
        )
    )


def pending_ids(session: Session, limit: int | None = None) -> Sequence[int]:
    """Messages received but not processed yet (new, or left over by a crash), oldest first."""
    query = (
        select(InboundMessage.id)
        .where(InboundMessage.status == MessageStatus.RECEIVED)
        .order_by(InboundMessage.id)
        .limit(limit)
    )
    return session.scalars(query).all()


def first_record_of(session: Session, dedupe_key: str, before_id: int) -> InboundMessage | None:
    """An earlier delivery of the same message that already made a ticket or comment."""
    query = (
        select(InboundMessage)
        .where(
            InboundMessage.dedupe_key == dedupe_key,
            InboundMessage.id != before_id,
            InboundMessage.status.in_(DONE_WITH_RECORD),
        )
        .order_by(InboundMessage.id)
        .limit(1)
    )
    return session.scalars(query).first()


def ticket_for_message_ids(session: Session, message_ids: Sequence[str]) -> int | None:
    """The ticket that a message with one of these Message-IDs made or commented on."""
    if not message_ids:
        return None
    query = (
        select(InboundMessage.ticket_id)
        .where(
            InboundMessage.message_id.in_(message_ids),
            InboundMessage.status.in_(DONE_WITH_RECORD),
        )
        .order_by(InboundMessage.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def ticket_by_key(session: Session, key: str) -> Ticket | None:
    return session.scalars(select(Ticket).where(Ticket.key == key)).first()


def save_blob(session: Session, sha256: str, content: bytes) -> None:
    """Store attachment content once per sha256, safe against concurrent writers."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(AttachmentBlob)
        .values(sha256=sha256, size=len(content), content=content)
        .on_conflict_do_nothing(index_elements=["sha256"])
    )


def set_fate(
    session: Session,
    message: InboundMessage,
    status: MessageStatus,
    *,
    ticket_id: int | None = None,
    duplicate_of_id: int | None = None,
    drop_reason: str | None = None,
    defects: list[str] | None = None,
) -> None:
    message.status = status
    message.ticket_id = ticket_id
    message.duplicate_of_id = duplicate_of_id
    message.drop_reason = drop_reason
    message.defects = defects or []
    message.fail_stage = None
    message.error = None
    message.processed_at = utcnow()


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
    query = select(InboundMessage).order_by(InboundMessage.id.desc()).limit(limit)
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


def attachments_of_ticket(session: Session, ticket_id: int) -> Sequence[Attachment]:
    query = select(Attachment).where(Attachment.ticket_id == ticket_id).order_by(Attachment.id)
    return session.scalars(query).all()
