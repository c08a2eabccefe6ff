"""Detection that needs the database: is this mail a follow-up to an existing ticket?"""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from ingest.mail import IncomingMail
from storage import repo


def ticket_key_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"\[({re.escape(prefix)}-\d+)\]")


def find_follow_up(mail: IncomingMail, session: Session, key_prefix: str) -> int | None:
    """The ticket this mail answers: by In-Reply-To/References, else by `[INQ-42]` in subject."""
    parsed = mail.parsed
    assert parsed is not None
    ticket_id = repo.ticket_for_message_ids(session, parsed.in_reply_to + parsed.references)
    if ticket_id is not None:
        return ticket_id
    found = ticket_key_pattern(key_prefix).search(parsed.subject)
    ticket = repo.ticket_by_key(session, found.group(1)) if found else None
    return ticket.id if ticket else None
