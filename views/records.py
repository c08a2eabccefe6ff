"""The ledger, tickets and attempts as plain dicts: what `--json` prints and what the human
output is made from. The CLI (and any other front end) shows these and nothing else. Times stay
`datetime`s (UTC from the store): JSON writes them as ISO 8601, people read them in the
configured zone (`cli.readable`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ingest.headers import decoded_headers, first_header
from storage import repo
from storage.models import (
    Attachment,
    InboundMessage,
    ProcessingAttempt,
    Ticket,
    TicketSuggestion,
)


def ticket_view(ticket: Ticket) -> dict[str, Any]:
    return {
        "key": ticket.key,
        "created_at": ticket.created_at,
        "source_kind": ticket.source_kind,
        "category": ticket.category,
        "subject": ticket.subject,
        "summary": ticket.summary,
        "requester_name": ticket.requester_name,
        "requester_email": ticket.requester_email,
        "requester_phone": ticket.requester_phone,
        "requester_company": ticket.requester_company,
        "assignee": ticket.assignee,
        "priority": ticket.priority,
        "status": ticket.status,
        "due_at": ticket.due_at,
        "labels": ticket.labels,
        "fields": ticket.fields,
        "rule_names": ticket.rule_names,
        "rules_version": ticket.rules_version,
        "inbound_message_id": ticket.inbound_message_id,
    }


def suggestion_view(suggestion: TicketSuggestion | None) -> dict[str, Any] | None:
    """What the triage model suggested when the ticket was made (docs/triage.md)."""
    if suggestion is None:
        return None
    return {
        "category": suggestion.category,
        "category_probability": suggestion.category_probability,
        "assignee": suggestion.assignee,
        "assignee_probability": suggestion.assignee_probability,
        "model_version": suggestion.model_version,
        "reason": suggestion.reason,
    }


def attachment_view(attachment: Attachment) -> dict[str, Any]:
    return {
        "id": attachment.id,
        "filename": attachment.filename,
        "original_filename": attachment.original_filename,
        "content_type": attachment.content_type,
        "size": attachment.size,
        "sha256": attachment.sha256,
        "inline": attachment.inline,
        "comment_id": attachment.comment_id,
    }


def message_view(message: InboundMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "received_at": message.received_at,
        "source": message.source,
        "message_id": message.message_id,
        "mail_from": message.mail_from,
        "rcpt_to": message.rcpt_to,
        "peer": message.peer,
        "size": message.size,
        "sha256": message.sha256,
        "status": message.status,
        "fail_stage": message.fail_stage,
        "error": message.error,
        "attempts": message.attempts,
        "processed_at": message.processed_at,
        "drop_reason": message.drop_reason,
        "rule_hits": message.rule_hits,
        "rule_misses": message.rule_misses,
        "defects": message.defects,
        "ticket_id": message.ticket_id,
        "duplicate_of_id": message.duplicate_of_id,
        "next_attempt_at": message.next_attempt_at,
        "discard_reason": message.discard_reason,
        "stage_timings": message.stage_timings,
    }


def attempt_view(attempt: ProcessingAttempt) -> dict[str, Any]:
    return {
        "attempted_at": attempt.attempted_at,
        "outcome": attempt.outcome,
        "stage": attempt.stage,
        "error": short_error(attempt.error),
        "host": attempt.host,
        "pid": attempt.pid,
        "username": attempt.username,
        "command": attempt.command,
    }


def history_of(session: Session, inbound_id: int) -> list[dict[str, Any]]:
    return [attempt_view(a) for a in repo.attempts_of(session, inbound_id)]


def failed_view(message: InboundMessage, raw_head: bytes) -> dict[str, Any]:
    headers = decoded_headers(raw_head)
    return {
        "id": message.id,
        "received_at": message.received_at,
        "source": message.source,
        "message_id": message.message_id,
        "from": first_header(headers, "From") or message.mail_from,
        "subject": first_header(headers, "Subject"),
        "stage": message.fail_stage,
        "error": short_error(message.error),
        "attempts": message.attempts,
        "failed_at": message.processed_at,
        "next_attempt_at": message.next_attempt_at,
    }


# What SQLAlchemy adds below a database error's message: the statement, the (hidden)
# parameters and a link. The driver's message is the line before them.
SQLALCHEMY_ADDENDA = ("(Background on this error at:", "[SQL: ", "[SQL parameters", "[parameters")


def short_error(error: str | None) -> str | None:
    """The exception type and message from a stored traceback (a database error's driver
    message, not its SQL)."""
    if not error:
        return error
    lines = [
        line
        for line in error.strip().splitlines()
        if line.strip() and not line.startswith(SQLALCHEMY_ADDENDA)
    ]
    return lines[-1].strip() if lines else None
