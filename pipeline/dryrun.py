"""Routing without writing anything: what `mailintake rules test` and `rules diff` show.

The real pipeline stages run (parse, detect, extract, follow-up, route, decide, assign), but the
round-robin cursor is only read and the session is rolled back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.mail import IncomingMail
from pipeline.context import PipelineContext
from pipeline.process import incoming_mail
from pipeline.stages import DRY_RUN_STAGES, examine
from rules.engine import CompiledRules, Evaluation, RulesRouter
from storage import repo
from storage.models import InboundMessage
from storage.states import Fate, Stage

COMPARED = ("outcome", "category", "assignee", "priority")


class DryRouter:
    """Routes mails with one set of rules and returns the explained evaluation."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        rules: CompiledRules,
        *,
        suggest: bool = True,
    ) -> None:
        self._evaluations: list[Evaluation] = []
        router = RulesRouter(lambda: rules, dry_run=True, on_evaluation=self._evaluations.append)
        self.pipeline = PipelineContext(settings, sessions, router)
        # Without `suggest`, the rules alone: no triage model is asked (`triage eval`).
        self.stages = tuple(s for s in DRY_RUN_STAGES if suggest or s[0] is not Stage.SUGGEST)

    def route(self, mail: IncomingMail) -> Evaluation:
        """Run every stage up to the decision (`mail.decision`); nothing is written."""
        examine(mail, self.pipeline)
        with self.pipeline.sessions() as session:
            for stage, run in self.stages:
                mail.stage = stage
                run(mail, self.pipeline, session)
            session.rollback()
        return self._evaluations.pop()


def rules_alone(
    settings: Settings, sessions: sessionmaker[Session], rules: CompiledRules
) -> Callable[[int], tuple[str | None, str | None]]:
    """What the rules alone (no triage suggestion) decide for a stored message, by ledger id:
    (category, assignee); the baseline `triage eval` compares the model with. A message whose
    raw bytes retention dropped (`purge`) cannot be routed again: (None, None)."""
    router = DryRouter(settings, sessions, rules, suggest=False)

    def decide(inbound_id: int) -> tuple[str | None, str | None]:
        with sessions() as session:
            row = session.get_one(InboundMessage, inbound_id)
            if row.raw_purged:
                return None, None
            mail = incoming_mail(row)
        router.route(mail)
        decision = mail.decision
        return (decision.category, decision.assignee) if decision else (None, None)

    return decide


def outcome(mail: IncomingMail) -> dict[str, Any]:
    """What `rules diff` compares: the fate and, for tickets, category, assignee, priority."""
    decision = mail.decision
    assert decision is not None
    if mail.fate is Fate.DROPPED:
        return {"outcome": f"dropped ({mail.drop_reason})"}
    if mail.fate is Fate.COMMENT:
        return {"outcome": "comment"}
    return {
        "outcome": "ticket",
        "category": decision.category,
        "assignee": decision.assignee,
        "priority": decision.priority,
    }


def _replay(router: DryRouter, mail: IncomingMail) -> dict[str, Any]:
    try:
        router.route(mail)
    except Exception as exc:  # a mail that cannot be routed is a result, not the end of the diff
        return {"outcome": f"fails: {type(exc).__name__}: {exc}"}
    return outcome(mail)


@dataclass
class Change:
    inbound_id: int
    ticket_key: str | None
    subject: str
    before: dict[str, Any]
    after: dict[str, Any]

    def differences(self) -> dict[str, tuple[Any, Any]]:
        return {
            key: (self.before.get(key), self.after.get(key))
            for key in COMPARED
            if self.before.get(key) != self.after.get(key)
        }


def diff(
    settings: Settings,
    sessions: sessionmaker[Session],
    current: CompiledRules,
    new: CompiledRules,
    since: datetime,
) -> tuple[int, list[Change]]:
    """Replay the stored raw mails received since `since` through both rule sets; returns how
    many were replayed and those whose outcome would change."""
    before, after = DryRouter(settings, sessions, current), DryRouter(settings, sessions, new)
    with sessions() as session:
        routed = repo.routed_since(session, since)
    changes = []
    for inbound_id, ticket_key in routed:
        with sessions() as session:
            row = session.get_one(InboundMessage, inbound_id)
            old_mail, new_mail = incoming_mail(row), incoming_mail(row)
        change = Change(
            inbound_id,
            ticket_key,
            "",
            _replay(before, old_mail),
            _replay(after, new_mail),
        )
        change.subject = old_mail.parsed.subject if old_mail.parsed else ""
        if change.differences():
            changes.append(change)
    return len(routed), changes
