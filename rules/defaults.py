"""The decision used when no routing rules are configured."""

from __future__ import annotations

from config import TicketSettings
from ingest.mail import Decision


def default_decision(tickets: TicketSettings) -> Decision:
    return Decision(
        category=tickets.default_category,
        assignee=tickets.default_assignee,
        priority=tickets.default_priority,
    )
