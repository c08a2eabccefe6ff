"""The objects that flow through the pipeline: one `IncomingMail` per ledger row."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from storage.states import Fate, Stage

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Envelope:
    """How a message reached us. `source` is one of smtp, lmtp, imap, file, stdin."""

    source: str
    mail_from: str | None = None
    rcpt_to: tuple[str, ...] = ()
    peer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MailAttachment:
    filename: str
    original_filename: str | None
    content_type: str
    content: bytes
    inline: bool = False
    content_id: str | None = None


@dataclass
class ParsedMail:
    """What the parser read from the raw bytes; text is always decoded `str`."""

    message_id: str | None
    subject: str
    from_name: str | None
    from_email: str | None
    to: list[str]
    cc: list[str]
    date: datetime | None
    headers: list[tuple[str, str]]
    text: str
    html: str | None
    attachments: list[MailAttachment]
    in_reply_to: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    reply_text: str | None = None  # `text` without the quoted earlier message (set by detect)

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), decoded."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


@dataclass
class Decision:
    """What routing decided for a message. Unset attributes take the `tickets:` defaults;
    whether it becomes a ticket at all is the pipeline's one decision, made after routing."""

    category: str | None = None
    assignee: str | None = None  # a person, or a team's name until `assign` picks a member
    priority: str | None = None
    due_at: datetime | None = None
    labels: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    rule_hits: list[str] = field(default_factory=list)  # the rules that matched and applied
    rule_misses: list[str] = field(default_factory=list)  # the rules tried that did not match
    rules_version: str | None = None
    drop_reason: str | None = None
    allow_auto_reply: bool = False  # a rule may let an auto-reply open a ticket
    # Picks the team member for a new ticket (round-robin takes a turn); the pipeline calls it
    # only once the message will certainly open a ticket.
    assign: Callable[[Session], str] | None = None


@dataclass(frozen=True)
class Suggestion:
    """What the triage model (triage/) proposes for a new ticket; the rules decide, and take it
    only where a rule asks (`suggested`, `from_suggestion`)."""

    category: str
    category_probability: float
    assignee: str | None
    assignee_probability: float
    model_version: int
    reason: tuple[str, ...]  # the three features that weighed most for the category


@dataclass
class Requester:
    """Who the inquiry is from: the caller, the FAX's sender, the form's writer; for a plain
    mail, its From. Set by the `extract` stage."""

    name: str | None = None
    email: str | None = None
    phone: str | None = None  # E.164 (+81312345678) when it reads as a number, else as written
    company: str | None = None


@dataclass(frozen=True)
class Earlier:
    """An earlier delivery of the same message that already made its ticket or comment."""

    inbound_id: int
    ticket_id: int | None


@dataclass
class IncomingMail:
    """One message on its way through the pipeline; `raw` is never modified."""

    inbound_id: int
    raw: bytes
    envelope: Envelope
    received_at: datetime
    dedupe_key: str  # see ingest.headers.identity_of; two deliveries with one key are one message
    parsed: ParsedMail | None = None
    source_kind: str = "email"  # phone, fax, webform or email, from the matching template
    fields: dict[str, Any] = field(default_factory=dict)  # extracted from the template
    requester: Requester = field(default_factory=Requester)
    auto_reply: str | None = None  # why it is an auto-reply/bounce/loop, if it is one
    duplicate_of: Earlier | None = None
    follow_up_ticket_id: int | None = None  # the ticket this mail answers
    suggestion: Suggestion | None = None  # set by the `suggest` stage when a model exists
    decision: Decision | None = None
    fate: Fate | None = None  # decided once, by the pipeline's `decide` stage (or `dedupe`)
    drop_reason: str | None = None  # why, when the fate is `dropped`
    stage: Stage | None = None  # the stage running now; names where a failure happened
    lease_owner: str | None = None  # the processing lease held while the stages run
    # Milliseconds each stage took, by stage value, in the order they ran (a failing stage too)
    timings: dict[str, float] = field(default_factory=dict)
    stage_started: float | None = None  # perf_counter() when the running stage began

    @contextmanager
    def in_stage(self, stage: Stage) -> Iterator[None]:
        """Run the body as `stage`: it names where a failure happened, and its duration goes
        into `timings` whether it finished or raised."""
        self.stage = stage
        self.stage_started = started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage.value] = round((time.perf_counter() - started) * 1000, 3)
            self.stage_started = None

    def timings_so_far(self) -> dict[str, float]:
        """`timings`, with the running stage's milliseconds up to now: the `store` stage writes
        them with the fate, in its one ledger update, while it still runs."""
        if self.stage is None or self.stage_started is None:
            return dict(self.timings)
        running = round((time.perf_counter() - self.stage_started) * 1000, 3)
        return {**self.timings, self.stage.value: running}
