"""The last stage: write the decided fate of an IncomingMail: a ticket, a comment, a drop or a
duplicate, with the rule hits and misses on the ledger row."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from ingest.mail import IncomingMail, ParsedMail
from pipeline.attempts import stage_timings
from storage import repo
from storage.models import TicketSuggestion
from storage.states import Fate
from triage.summary import summarize


def store(session: Session, mail: IncomingMail, key_prefix: str) -> None:
    """Write what the pipeline decided for `mail` (its `fate`) in the caller's transaction."""
    parsed, fate, decision = mail.parsed, mail.fate, mail.decision
    assert parsed is not None and fate is not None, "store after the decision"
    ticket_id = duplicate_of_id = None
    if fate is Fate.DUPLICATE:
        assert mail.duplicate_of is not None
        ticket_id, duplicate_of_id = mail.duplicate_of.ticket_id, mail.duplicate_of.inbound_id
    elif fate is Fate.COMMENT:
        assert mail.follow_up_ticket_id is not None
        ticket_id = mail.follow_up_ticket_id
        comment_id = _add_comment(session, mail, ticket_id)
        _add_attachments(session, parsed, mail.inbound_id, comment_id=comment_id)
    elif fate is Fate.TICKET:
        ticket_id = _add_ticket(session, mail, key_prefix)
        _add_attachments(session, parsed, mail.inbound_id, ticket_id=ticket_id)
    repo.set_fate(
        session,
        mail.inbound_id,
        fate,
        ticket_id=ticket_id,
        duplicate_of_id=duplicate_of_id,
        drop_reason=mail.drop_reason,
        defects=parsed.defects,
        rule_hits=decision.rule_hits if decision else [],
        rule_misses=decision.rule_misses if decision else [],
        stage_timings=stage_timings(mail),
    )
    if fate in (Fate.TICKET, Fate.COMMENT) and ticket_id is not None:
        repo.notify_ticket(session, ticket_id)  # delivered to listeners on commit


def _add_ticket(session: Session, mail: IncomingMail, prefix: str) -> int:
    parsed, decision = mail.parsed, mail.decision
    assert parsed is not None and decision is not None
    requester = mail.requester
    ticket_id = repo.add_ticket(
        session,
        {
            "key": f"new-{mail.inbound_id}",
            "source_kind": mail.source_kind,
            "category": decision.category,
            "subject": parsed.subject,
            "body": parsed.text,
            "body_html": parsed.html,
            "requester_name": requester.name,
            "requester_email": requester.email,
            "requester_phone": requester.phone,
            "requester_company": requester.company,
            "assignee": decision.assignee,
            "priority": decision.priority,
            "due_at": decision.due_at,
            "labels": decision.labels,
            "fields": {**mail.fields, **decision.fields},
            "rule_names": decision.rule_hits,
            "rules_version": decision.rules_version,
            "inbound_message_id": mail.inbound_id,
            "origin_key": mail.dedupe_key,
            "summary": summarize(parsed.subject, parsed.text, mail.fields, parsed.reply_text),
        },
        key=lambda new_id: f"{prefix}-{new_id}",
    )
    if mail.suggestion is not None:
        _add_suggestion(session, mail, ticket_id)
    return ticket_id


def _add_suggestion(session: Session, mail: IncomingMail, ticket_id: int) -> None:
    """The triage model's suggestion, in its own table: the ticket's columns are the rules'."""
    suggested = mail.suggestion
    assert suggested is not None
    repo.save_suggestion(
        session,
        TicketSuggestion(
            ticket_id=ticket_id,
            category=suggested.category,
            category_probability=suggested.category_probability,
            assignee=suggested.assignee,
            assignee_probability=suggested.assignee_probability,
            model_version=suggested.model_version,
            reason=list(suggested.reason),
        ),
    )


def _add_comment(session: Session, mail: IncomingMail, ticket_id: int) -> int:
    parsed = mail.parsed
    assert parsed is not None
    return repo.add_comment(
        session,
        {
            "ticket_id": ticket_id,
            "author_name": parsed.from_name,
            "author_email": parsed.from_email,
            "body": parsed.reply_text or parsed.text,
            "body_full": parsed.text,
            "inbound_message_id": mail.inbound_id,
            "origin_key": mail.dedupe_key,
        },
    )


def _add_attachments(
    session: Session,
    parsed: ParsedMail,
    inbound_id: int,
    *,
    ticket_id: int | None = None,
    comment_id: int | None = None,
) -> None:
    rows = []
    for att in parsed.attachments:
        digest = hashlib.sha256(att.content).hexdigest()
        repo.save_blob(session, digest, att.content)
        rows.append(
            {
                "inbound_message_id": inbound_id,
                "ticket_id": ticket_id,
                "comment_id": comment_id,
                "filename": att.filename,
                "original_filename": att.original_filename,
                "content_type": att.content_type,
                "content_id": att.content_id,
                "inline": att.inline,
                "size": len(att.content),
                "sha256": digest,
            }
        )
    repo.add_attachments(session, rows)
