"""Builders for routing-rule tests: a rules file from YAML text, a parsed IncomingMail."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config import load_settings
from ingest.intake import unstored_mail
from ingest.mail import Envelope, IncomingMail
from ingest.parse import parse
from rules.engine import CompiledRules
from rules.load import load_rules

ROOT = Path(__file__).resolve().parents[1]
# The authserv-id of our MTA in tests, as in the shipped config.yaml.
OUR_MTA = "mx.wine-importer.example.jp"
# Tuesday 2026-11-24 10:00 in Tokyo: inside business hours.
TUESDAY_10_JST = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)

PEOPLE = """\
people: [yamada, sato, suzuki]
teams:
  sales: {members: [yamada, sato, suzuki], strategy: round_robin}
categories: [inquiry, order, quote, callback]
priorities: [low, normal, high, urgent]
business_hours:
  closures: [2026-12-29]  # Mon 2026-11-23, used by the tests, is a public holiday
"""


def write_rules(folder: Path, body: str, *, with_people: bool = True) -> Path:
    """Write a rules file; `body` is YAML (dedented), after the standard people and teams."""
    path = folder / "rules.yaml"
    path.write_text((PEOPLE if with_people else "") + textwrap.dedent(body), encoding="utf-8")
    return path


def rules_from(folder: Path, body: str) -> CompiledRules:
    """Rules from YAML text, trusting Authentication-Results from OUR_MTA."""
    return load_rules(write_rules(folder, body), authserv_id=OUR_MTA)


def shipped_rules() -> CompiledRules:
    """The shipped rules.yaml, with the shipped config.yaml's `authserv_id`."""
    return load_rules(
        ROOT / "rules.yaml", authserv_id=load_settings(ROOT / "config.yaml").authserv_id
    )


def incoming(
    raw: bytes,
    *,
    source_kind: str = "email",
    fields: dict[str, Any] | None = None,
    auto_reply: str | None = None,
    follow_up_ticket_id: int | None = None,
    received_at: datetime = TUESDAY_10_JST,
    rcpt_to: tuple[str, ...] = (),
) -> IncomingMail:
    mail = unstored_mail(raw, Envelope(source="file", rcpt_to=rcpt_to), received_at)
    mail.parsed = parse(raw)
    mail.source_kind = source_kind
    mail.fields = fields or {}
    mail.auto_reply = auto_reply
    mail.follow_up_ticket_id = follow_up_ticket_id
    return mail
