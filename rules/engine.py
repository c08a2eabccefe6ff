"""Match compiled rules against a mail, explain every hit and miss, and make the Decision.

The first matching rule decides; a rule with `continue: true` lets later rules add to the
decision. An attribute (category, assignee, priority, due time, drop, allow_auto_reply) is set by
the first matching rule that sets it; labels accumulate and fields merge, earlier rules winning.
`defaults` then fill what no matching rule set; the pipeline fills the rest from `tickets:`.

Routing writes nothing: a team assignee comes back as a `Decision.assign` that the pipeline
calls only once the mail will open a ticket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ingest.mail import Decision, IncomingMail, Suggestion
from rules.assign import pick_assignee
from rules.calendar import Calendar
from rules.conditions import Facts, Node, compile_condition
from rules.index import RuleIndex
from rules.schema import Actions, AssigneeRef, RulesFile, Then


@dataclass
class CompiledRule:
    name: str
    line: int | None
    condition: Node
    then: Then


@dataclass
class CompiledRules:
    """A validated rules file, ready to route; `version` is the sha256 of the file's bytes."""

    path: Path
    version: str
    source: RulesFile
    rules: list[CompiledRule]
    calendar: Calendar
    index: RuleIndex
    warnings: list[str] = field(default_factory=list)
    authserv_id: str | None = None  # whose Authentication-Results count (config `authserv_id`)

    @cached_property
    def names(self) -> list[str]:
        return [rule.name for rule in self.rules]

    @classmethod
    def build(
        cls,
        source: RulesFile,
        path: Path,
        version: str,
        lines: Sequence[int | None],
        authserv_id: str | None = None,
    ) -> CompiledRules:
        calendar = Calendar(source.business_hours)
        rules = [
            CompiledRule(rule.name, line, compile_condition(rule.when, calendar), rule.then)
            for rule, line in zip(source.rules, lines, strict=True)
        ]
        index = RuleIndex([rule.when for rule in source.rules])
        return cls(path, version, source, rules, calendar, index, authserv_id=authserv_id)


@dataclass
class Plan:
    """The decision before anything that needs the database (who in a team, which ticket)."""

    category: str | None = None
    assignee: AssigneeRef | None = None
    priority: str | None = None
    due_in: str | None = None
    labels: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    drop_reason: str | None = None
    allow_auto_reply: bool | None = None
    rule_hits: list[str] = field(default_factory=list)
    rule_misses: list[str] = field(default_factory=list)

    def add(self, actions: Actions, suggestion: Suggestion | None = None) -> None:
        """Take what `actions` sets, unless an earlier (higher) rule already set it; a rule's
        `from_suggestion` takes the triage model's `suggestion` where the rule sets nothing."""
        for name in ("category", "assignee", "priority", "due_in"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(actions, name))
        if isinstance(actions, Then) and suggestion is not None:
            self.take(actions.from_suggestion, suggestion)
        self.labels.extend(label for label in actions.labels if label not in self.labels)
        for key, value in actions.fields.items():
            self.fields.setdefault(key, value)
        if isinstance(actions, Then):
            self.drop_reason = self.drop_reason or actions.drop
            if self.allow_auto_reply is None:
                self.allow_auto_reply = actions.allow_auto_reply

    def take(self, targets: Sequence[str], suggestion: Suggestion) -> None:
        if "category" in targets and self.category is None:
            self.category = suggestion.category
        if "assignee" in targets and self.assignee is None and suggestion.assignee:
            self.assignee = AssigneeRef.model_validate(suggestion.assignee)


@dataclass
class RuleOutcome:
    rule: str
    line: int | None
    result: str  # applied | matched-not-applied | missed
    reason: str | None = None


@dataclass
class Evaluation:
    rules_version: str
    plan: Plan
    outcomes: list[RuleOutcome]  # every rule when explained, else empty

    def to_dict(self) -> dict[str, Any]:
        return {"rules_version": self.rules_version, "rules": [asdict(o) for o in self.outcomes]}


def evaluate(
    rules: CompiledRules, mail: IncomingMail, *, explain: bool = False, linear: bool = False
) -> Evaluation:
    """Run the rules in order. With `explain`, every rule is tried and its outcome recorded;
    without, evaluation stops at the rule that decides, and only the rules the index names as
    candidates are tried (`linear` tries each in turn, as a reference for tests and benches)."""
    facts = Facts(mail, rules.calendar, rules.authserv_id)
    if explain or linear:
        plan, outcomes = _linear(rules, facts, explain)
    else:
        plan, outcomes = _indexed(rules, facts), []
    plan.add(rules.source.defaults)
    return Evaluation(rules.version, plan, outcomes)


def _linear(rules: CompiledRules, facts: Facts, explain: bool) -> tuple[Plan, list[RuleOutcome]]:
    plan, outcomes = Plan(), []
    decided_by: str | None = None
    for rule in rules.rules:
        if decided_by and not explain:
            break
        failed = rule.condition.failure(facts)
        if failed is not None:
            plan.rule_misses.append(rule.name)
            if explain:
                outcomes.append(RuleOutcome(rule.name, rule.line, "missed", failed.describe(facts)))
        elif decided_by:
            reason = f"matched, but rule `{decided_by}` decided first"
            outcomes.append(RuleOutcome(rule.name, rule.line, "matched-not-applied", reason))
        else:
            plan.add(rule.then, facts.mail.suggestion)
            plan.rule_hits.append(rule.name)
            if explain:
                outcomes.append(RuleOutcome(rule.name, rule.line, "applied"))
            if not rule.then.continue_:
                decided_by = facts.decided_by = rule.name
    return plan, outcomes


def _indexed(rules: CompiledRules, facts: Facts) -> Plan:
    """What `_linear` gives without explanation, trying only the index's candidates. Every rule
    before the deciding one that did not apply is a miss, as when each is tried: the index
    skips only rules that cannot hold."""
    plan, applied = Plan(), []
    tried = len(rules.rules)
    for position in rules.index.candidates(facts):
        rule = rules.rules[position]
        if rule.condition.failure(facts) is None:
            plan.add(rule.then, facts.mail.suggestion)
            plan.rule_hits.append(rule.name)
            applied.append(position)
            if not rule.then.continue_:
                facts.decided_by = rule.name
                tried = position + 1
                break
    start = 0
    for position in applied:  # the names between the applied rules, sliced, not one by one
        plan.rule_misses += rules.names[start:position]
        start = position + 1
    plan.rule_misses += rules.names[start:tried]
    return plan


def decision_of(
    evaluation: Evaluation, rules: CompiledRules, mail: IncomingMail, *, dry_run: bool = False
) -> Decision:
    """The Decision for an evaluated mail. With `dry_run`, a round-robin team's next member is
    only read, never taken."""
    plan = evaluation.plan
    ref = plan.assignee
    return Decision(
        category=plan.category,
        assignee=ref.name if ref else None,
        priority=plan.priority,
        due_at=rules.calendar.due(plan.due_in, mail.received_at) if plan.due_in else None,
        labels=list(plan.labels),
        fields=dict(plan.fields),
        rule_hits=list(plan.rule_hits),
        rule_misses=list(plan.rule_misses),
        rules_version=rules.version,
        drop_reason=plan.drop_reason,
        allow_auto_reply=bool(plan.allow_auto_reply),
        assign=_assigner(ref, rules.source, dry_run) if ref else None,
    )


def _assigner(ref: AssigneeRef, rules: RulesFile, dry_run: bool) -> Callable[[Session], str]:
    def assign(session: Session) -> str:
        return pick_assignee(ref, rules, session, advance=not dry_run)

    return assign


class RulesRouter:
    """A `PipelineContext.router` that routes by rules.

    `current` returns the rules in force; it is called once per message, so a reload between
    two messages never mixes two versions in one decision. `on_evaluation` (used by `rules
    test`) receives the full explanation; `dry_run` reads the round-robin cursor without moving
    it.
    """

    def __init__(
        self,
        current: Callable[[], CompiledRules],
        *,
        dry_run: bool = False,
        on_evaluation: Callable[[Evaluation], None] | None = None,
    ) -> None:
        self.current = current
        self.dry_run = dry_run
        self.on_evaluation = on_evaluation

    def __call__(self, mail: IncomingMail) -> Decision:
        rules = self.current()
        evaluation = evaluate(rules, mail, explain=self.on_evaluation is not None)
        if self.on_evaluation:
            self.on_evaluation(evaluation)
        return decision_of(evaluation, rules, mail, dry_run=self.dry_run)
