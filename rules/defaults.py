"""The decision used when no routing rules are configured."""

from __future__ import annotations

from config import TicketSettings
from ingest.mail import Decision, IncomingMail


def default_decision(tickets: TicketSettings, mail: IncomingMail) -> Decision:
    return Decision(
        source_kind=mail.source_kind,
        category=tickets.default_category,
        assignee=tickets.default_assignee,
        priority=tickets.default_priority,
    )
