"""Match compiled rules against a mail, explain every hit and miss, and make the Decision.

The first matching rule decides; a rule with `continue: true` lets later rules add to the
decision. An attribute (category, assignee, priority, due time, drop, allow_auto_reply) is set by
the first matching rule that sets it; labels accumulate and fields merge, earlier rules winning.
`defaults` then fill what no matching rule set, and the `tickets:` settings fill the rest.

Conditions compile to small node objects. `node.failure(facts)` returns None when the node
holds, else the node that made it fail, which can `describe` the failure in plain words; so
routing does no string work for misses unless an explanation is asked for.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from config import TicketSettings
from ingest.mail import Decision, IncomingMail
from rules.schema import (
    WEEKDAYS,
    Actions,
    AssigneeRef,
    AttachmentTest,
    AuthTest,
    BusinessHours,
    Condition,
    RulesFile,
    TextTest,
    Then,
    compile_regex,
    parse_due,
)
from storage import repo

AUTH_RESULT = re.compile(r"\b(spf|dkim|dmarc)\s*=\s*([a-z]+)", re.IGNORECASE)
AUTH_COMMENT = re.compile(r"\([^()]*\)")


def normalise(text: str) -> str:
    """Fold case and width so ＦＡＸ, Fax and fax compare equal, as do ｶﾅ and カナ."""
    return unicodedata.normalize("NFKC", text).casefold()


def _show(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"`{text[:limit]}…`" if len(text) > limit else f"`{text}`"


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


class Calendar:
    """Business days and hours in the service's time zone: the opening weekdays and hours,
    less Japan's public holidays (from the maintained `holidays` package, so every year is
    right) and the company's own closures."""

    COUNTRY = "JP"  # whose public holidays are closed days

    def __init__(self, hours: BusinessHours) -> None:
        import threading  # imported here so that the class moves to its own module whole

        import holidays

        self.zone = hours.zone
        self.weekdays = {WEEKDAYS.index(day) for day in hours.weekdays}
        self.open, self.close = hours.open, hours.close
        self.closures = frozenset(hours.closures)
        # Computes a year on first use; the lock keeps a router thread from reading a year
        # another thread is still filling in.
        self.public_holidays = holidays.country_holidays(self.COUNTRY, language="ja")
        self.holidays_lock = threading.Lock()

    def local(self, moment: datetime) -> datetime:
        """`moment` in the business zone; it must be aware (the store gives aware UTC)."""
        if moment.tzinfo is None:
            raise ValueError(f"naive datetime {moment!r}: pass an aware one (UTC from the store)")
        return moment.astimezone(self.zone)

    def closed_day(self, day: date) -> str | None:
        """Why `day` is not a business day, or None if it is."""
        if day in self.closures:
            return "a company closure"
        with self.holidays_lock:
            holiday = self.public_holidays.get(day)
        if holiday:
            return f"a public holiday ({holiday})"
        if day.weekday() not in self.weekdays:
            return "not a business day"
        return None

    def closed_because(self, moment: datetime) -> str | None:
        """None inside business hours, else why not (holiday, closure, weekend, outside hours)."""
        local = self.local(moment)
        closed = self.closed_day(local.date())
        if closed:
            return closed
        if not self.open <= local.time() < self.close:
            return f"outside {self.open:%H:%M}-{self.close:%H:%M}"
        return None

    def next_business_day(self, after: date) -> date:
        day = after + timedelta(days=1)
        while self.closed_day(day):
            day += timedelta(days=1)
        return day

    def due(self, due_in: str, received_at: datetime) -> datetime:
        minutes, at = parse_due(due_in)
        if at is None:
            return self.local(received_at).astimezone(UTC) + timedelta(minutes=minutes)
        day = self.next_business_day(self.local(received_at).date())
        return datetime.combine(day, at, tzinfo=self.zone).astimezone(UTC)


class Facts:
    """What conditions look at, computed once per mail and only when some rule asks."""

    def __init__(self, mail: IncomingMail, calendar: Calendar, authserv_id: str | None) -> None:
        assert mail.parsed is not None, "route only parsed mail"
        self.mail = mail
        self.parsed = mail.parsed
        self.calendar = calendar
        self.authserv_id = authserv_id
        self._texts: dict[str, tuple[list[str], list[str]]] = {}
        self._auth: dict[str, set[str]] | None = None

    def texts(self, selector: str) -> tuple[list[str], list[str]]:
        """The values under `selector` as written and normalised (see `normalise`)."""
        found = self._texts.get(selector)
        if found is None:
            raw = self._raw(selector)
            found = self._texts[selector] = (raw, [normalise(v) for v in raw])
        return found

    def _raw(self, selector: str) -> list[str]:
        kind, _, name = selector.partition(":")
        parsed, mail = self.parsed, self.mail
        recipients = list(dict.fromkeys([*parsed.to, *parsed.cc, *mail.envelope.rcpt_to]))
        sender = [parsed.from_email] if parsed.from_email else []
        values: dict[str, Callable[[], list[str]]] = {
            "from.address": lambda: sender,
            "from.domain": lambda: [_domain(a) for a in sender],
            "to.address": lambda: recipients,
            "to.domain": lambda: [_domain(a) for a in recipients],
            "subject": lambda: [parsed.subject] if parsed.subject else [],
            "body": lambda: [parsed.text] if parsed.text else [],
            "source_kind": lambda: [mail.source_kind],
            "header": lambda: [v for k, v in parsed.headers if k.lower() == name.lower()],
            "field": lambda: (
                [] if mail.fields.get(name) in (None, "") else [str(mail.fields[name])]
            ),
            "attachment.type": lambda: [a.content_type for a in self.attachments()],
            "attachment.name": lambda: [a.filename for a in self.attachments()],
        }
        return values[kind]()

    def attachments(self) -> list[Any]:
        return [a for a in self.parsed.attachments if not a.inline]

    def auth(self) -> dict[str, set[str]]:
        """Verdicts per method from the Authentication-Results header(s) we trust."""
        if self._auth is None:
            self._auth = {}
            for value in self._trusted_auth_headers():
                _serv, _, results = AUTH_COMMENT.sub("", value).partition(";")
                for method, verdict in AUTH_RESULT.findall(results):
                    self._auth.setdefault(method.lower(), set()).add(verdict.lower())
        return self._auth

    def _trusted_auth_headers(self) -> list[str]:
        values = [v for k, v in self.parsed.headers if k.lower() == "authentication-results"]
        if self.authserv_id is None:
            return values[:1]  # the topmost one, added by our own MTA
        wanted = self.authserv_id.casefold()
        return [v for v in values if v.split(";", 1)[0].strip().casefold().split()[:1] == [wanted]]


class Node(Protocol):
    summary: str

    def failure(self, facts: Facts) -> Node | None: ...

    def describe(self, facts: Facts) -> str: ...


class Matcher:
    """The operators of one TextTest, ready to run."""

    def __init__(self, test: TextTest) -> None:
        self.exists = test.exists
        ops: list[tuple[str, Callable[[str, str], bool]]] = []
        if test.equals is not None:
            wanted = normalise(test.equals)
            ops.append((f"equals `{test.equals}`", lambda _r, n: n == wanted))
        if test.contains:
            parts = [normalise(p) for p in test.contains]
            ops.append(
                (
                    f"contains any of {_quoted(test.contains)}",
                    lambda _r, n: any(p in n for p in parts),
                )
            )
        if test.starts_with:
            starts = tuple(normalise(p) for p in test.starts_with)
            ops.append(
                (f"starts with {_quoted(test.starts_with)}", lambda _r, n: n.startswith(starts))
            )
        if test.ends_with:
            ends = tuple(normalise(p) for p in test.ends_with)
            ops.append((f"ends with {_quoted(test.ends_with)}", lambda _r, n: n.endswith(ends)))
        if test.regex is not None:
            pattern = compile_regex(test.regex)
            ops.append((f"matches /{test.regex}/", lambda r, _n: pattern.search(r) is not None))
        if test.in_ is not None:
            allowed = {normalise(v) for v in test.in_}
            ops.append((f"is one of {_quoted(test.in_)}", lambda _r, n: n in allowed))
        self.ops = [op for _, op in ops]
        words = [text for text, _ in ops]
        if self.exists is not None:
            words.insert(0, "is present" if self.exists else "is absent")
        self.wanted = " and ".join(words)

    def matches(self, raw: str, norm: str) -> bool:
        return all(op(raw, norm) for op in self.ops)

    def holds(self, raw: list[str], norm: list[str]) -> bool:
        if self.exists is not None and bool(raw) != self.exists:
            return False
        if not self.ops:
            return True
        return any(self.matches(r, n) for r, n in zip(raw, norm, strict=True))


class TextCheck:
    def __init__(self, label: str, selector: str, test: TextTest) -> None:
        self.label, self.selector, self.matcher = label, selector, Matcher(test)
        self.summary = f"{label} {self.matcher.wanted}"

    def failure(self, facts: Facts) -> Node | None:
        return None if self.matcher.holds(*facts.texts(self.selector)) else self

    def describe(self, facts: Facts) -> str:
        raw, _ = facts.texts(self.selector)
        found = ", ".join(_show(v) for v in raw[:5]) if raw else "(none)"
        return f"{self.label} is {found}; wanted: {self.matcher.wanted}"


class AttachmentCheck:
    def __init__(self, test: AttachmentTest) -> None:
        self.present = test.present
        self.type = Matcher(test.type) if test.type else None
        self.name = Matcher(test.name) if test.name else None
        wanted = [f"type {self.type.wanted}"] if self.type else []
        wanted += [f"name {self.name.wanted}"] if self.name else []
        self.summary = (
            f"has an attachment{' whose ' + ' and '.join(wanted) if wanted else ''}"
            if self.present
            else "has no attachment"
        )

    def _fits(self, index: int, facts: Facts) -> bool:
        for matcher, selector in ((self.type, "attachment.type"), (self.name, "attachment.name")):
            raw, norm = facts.texts(selector)
            if matcher and not matcher.matches(raw[index], norm[index]):
                return False
        return True

    def failure(self, facts: Facts) -> Node | None:
        count = len(facts.attachments())
        found = any(self._fits(i, facts) for i in range(count))
        return None if found == self.present else self

    def describe(self, facts: Facts) -> str:
        names, _ = facts.texts("attachment.name")
        types, _ = facts.texts("attachment.type")
        have = ", ".join(f"{n} ({t})" for n, t in zip(names, types, strict=True)) or "none"
        return f"attachments: {have}; wanted: {self.summary}"


class FlagCheck:
    """follow_up / auto_reply: true or false."""

    def __init__(self, label: str, read: Callable[[IncomingMail], Any], expected: bool) -> None:
        self.label, self.read, self.expected = label, read, expected
        self.summary = f"{label} is {str(expected).lower()}"

    def failure(self, facts: Facts) -> Node | None:
        return None if (self.read(facts.mail) is not None) == self.expected else self

    def describe(self, facts: Facts) -> str:
        value = self.read(facts.mail)
        actual = "false" if value is None else f"true ({value})"
        return f"{self.label} is {actual}; wanted {str(self.expected).lower()}"


class AuthCheck:
    def __init__(self, test: AuthTest) -> None:
        self.wanted = {m: v for m, v in test.model_dump().items() if v is not None}
        self.wanted_text = " ".join(f"{m}={v}" for m, v in self.wanted.items())
        self.summary = f"Authentication-Results {self.wanted_text}"

    def failure(self, facts: Facts) -> Node | None:
        verdicts = facts.auth()
        ok = all(v in verdicts.get(m, set()) for m, v in self.wanted.items())
        return None if ok else self

    def describe(self, facts: Facts) -> str:
        verdicts = facts.auth()
        found = " ".join(f"{m}={'/'.join(sorted(v))}" for m, v in sorted(verdicts.items()))
        return f"Authentication-Results says {found or 'nothing'}; wanted {self.wanted_text}"


class BusinessHoursCheck:
    def __init__(self, calendar: Calendar, expected: bool) -> None:
        self.calendar, self.expected = calendar, expected
        self.summary = "received in business hours" if expected else "received out of hours"

    def failure(self, facts: Facts) -> Node | None:
        inside = self.calendar.closed_because(facts.mail.received_at) is None
        return None if inside == self.expected else self

    def describe(self, facts: Facts) -> str:
        local = self.calendar.local(facts.mail.received_at)
        why = self.calendar.closed_because(facts.mail.received_at) or "in business hours"
        return (
            f"received {local:%a %Y-%m-%d %H:%M} {self.calendar.zone.key} ({why}); wanted "
            f"{'business hours' if self.expected else 'out of hours'}"
        )


class Always:
    summary = "always"

    def failure(self, facts: Facts) -> Node | None:
        return None

    def describe(self, facts: Facts) -> str:
        return "always holds"


class AllOf:
    def __init__(self, parts: list[Node]) -> None:
        self.parts = parts
        self.summary = " and ".join(p.summary for p in parts)

    def failure(self, facts: Facts) -> Node | None:
        for part in self.parts:
            failed = part.failure(facts)
            if failed is not None:
                return failed
        return None

    def describe(self, facts: Facts) -> str:
        failed = self.failure(facts)
        return failed.describe(facts) if failed else "all hold"


class AnyOf:
    def __init__(self, parts: list[Node]) -> None:
        self.parts = parts
        self.summary = "any of (" + "; ".join(p.summary for p in parts) + ")"

    def failure(self, facts: Facts) -> Node | None:
        if any(part.failure(facts) is None for part in self.parts):
            return None
        return self

    def describe(self, facts: Facts) -> str:
        reasons = [f"({i}) {p.describe(facts)}" for i, p in enumerate(self.parts, 1)]
        return "none of the alternatives holds: " + "; ".join(reasons)


class NoneOf:
    def __init__(self, part: Node) -> None:
        self.part = part
        self.summary = f"not ({part.summary})"

    def failure(self, facts: Facts) -> Node | None:
        return self if self.part.failure(facts) is None else None

    def describe(self, facts: Facts) -> str:
        return f"`{self.part.summary}` holds; wanted it not to"


def compile_condition(cond: Condition, calendar: Calendar) -> Node:
    parts: list[Node] = []
    if cond.all_:
        parts.append(AllOf([compile_condition(c, calendar) for c in cond.all_]))
    if cond.any_:
        parts.append(AnyOf([compile_condition(c, calendar) for c in cond.any_]))
    if cond.not_:
        parts.append(NoneOf(compile_condition(cond.not_, calendar)))
    if cond.always:
        parts.append(Always())
    for label, address in (("from", cond.from_), ("to", cond.to)):
        if address and address.address:
            parts.append(TextCheck(f"{label} address", f"{label}.address", address.address))
        if address and address.domain:
            parts.append(TextCheck(f"{label} domain", f"{label}.domain", address.domain))
    for label, test in (
        ("subject", cond.subject),
        ("body", cond.body),
        ("source_kind", cond.source_kind),
    ):
        if test:
            parts.append(TextCheck(label, label, test))
    if cond.header:
        parts.append(
            TextCheck(f"header {cond.header.name}", f"header:{cond.header.name}", cond.header)
        )
    if cond.field:
        parts.append(TextCheck(f"field {cond.field.name}", f"field:{cond.field.name}", cond.field))
    if cond.attachment:
        parts.append(AttachmentCheck(cond.attachment))
    if cond.follow_up is not None:
        parts.append(FlagCheck("follow_up", lambda m: m.follow_up_ticket_id, cond.follow_up))
    if cond.auto_reply is not None:
        parts.append(FlagCheck("auto_reply", lambda m: m.auto_reply, cond.auto_reply))
    if cond.auth:
        parts.append(AuthCheck(cond.auth))
    if cond.business_hours is not None:
        parts.append(BusinessHoursCheck(calendar, cond.business_hours))
    return parts[0] if len(parts) == 1 else AllOf(parts)


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
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, source: RulesFile, path: Path, version: str, lines: Sequence[int | None]
    ) -> CompiledRules:
        calendar = Calendar(source.business_hours)
        rules = [
            CompiledRule(rule.name, line, compile_condition(rule.when, calendar), rule.then)
            for rule, line in zip(source.rules, lines, strict=True)
        ]
        return cls(path, version, source, rules, calendar)


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
    rule_names: list[str] = field(default_factory=list)

    def add(self, actions: Actions) -> None:
        """Take what `actions` sets, unless an earlier (higher) rule already set it."""
        for name in ("category", "assignee", "priority", "due_in"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(actions, name))
        self.labels.extend(label for label in actions.labels if label not in self.labels)
        for key, value in actions.fields.items():
            self.fields.setdefault(key, value)
        if isinstance(actions, Then):
            self.drop_reason = self.drop_reason or actions.drop
            if self.allow_auto_reply is None:
                self.allow_auto_reply = actions.allow_auto_reply


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


def evaluate(rules: CompiledRules, mail: IncomingMail, *, explain: bool = False) -> Evaluation:
    """Run the rules in order. With `explain`, every rule is tried and its outcome recorded;
    without, evaluation stops at the rule that decides."""
    facts = Facts(mail, rules.calendar, rules.source.authserv_id)
    plan, outcomes = Plan(), []
    decided_by: str | None = None
    for rule in rules.rules:
        if decided_by and not explain:
            break
        failed = rule.condition.failure(facts)
        if failed is not None:
            if explain:
                outcomes.append(RuleOutcome(rule.name, rule.line, "missed", failed.describe(facts)))
        elif decided_by:
            reason = f"matched, but rule `{decided_by}` decided first"
            outcomes.append(RuleOutcome(rule.name, rule.line, "matched-not-applied", reason))
        else:
            plan.add(rule.then)
            plan.rule_names.append(rule.name)
            if explain:
                outcomes.append(RuleOutcome(rule.name, rule.line, "applied"))
            if not rule.then.continue_:
                decided_by = rule.name
    plan.add(rules.source.defaults)
    return Evaluation(rules.version, plan, outcomes)


def makes_ticket(plan: Plan, mail: IncomingMail) -> bool:
    """Whether the mail will open a ticket (see `ingest.pipeline.route_stage`); only then is a
    team's round-robin cursor advanced."""
    auto_reply_dropped = mail.auto_reply is not None and not plan.allow_auto_reply
    return not plan.drop_reason and mail.follow_up_ticket_id is None and not auto_reply_dropped


def pick_assignee(ref: AssigneeRef, rules: RulesFile, session: Session, *, advance: bool) -> str:
    """A person as is; for a team, a member by its strategy. With `advance` false (dry runs)
    the round-robin cursor is only read."""
    team = rules.teams.get(ref.name)
    if team is None:
        return ref.name
    strategy = ref.strategy or team.strategy
    if strategy == "fixed":
        return ref.name
    if strategy == "round_robin":
        turn = (
            repo.advance_assignment_cursor(session, ref.name)
            if advance
            else repo.peek_assignment_cursor(session, ref.name) + 1
        )
        return team.members[(turn - 1) % len(team.members)]
    counts = repo.open_ticket_counts(session, team.members)
    return min(team.members, key=lambda member: counts.get(member, 0))


def decide(
    evaluation: Evaluation,
    rules: CompiledRules,
    mail: IncomingMail,
    session: Session,
    tickets: TicketSettings,
    *,
    dry_run: bool = False,
) -> Decision:
    plan = evaluation.plan
    ref = plan.assignee
    if ref is None:
        assignee = tickets.default_assignee
    elif makes_ticket(plan, mail):
        assignee = pick_assignee(ref, rules.source, session, advance=not dry_run)
    else:
        assignee = ref.name
    return Decision(
        source_kind=mail.source_kind,
        category=plan.category or tickets.default_category,
        assignee=assignee,
        priority=plan.priority or tickets.default_priority,
        due_at=rules.calendar.due(plan.due_in, mail.received_at) if plan.due_in else None,
        labels=list(plan.labels),
        fields=dict(plan.fields),
        rule_names=list(plan.rule_names),
        rules_version=rules.version,
        drop_reason=plan.drop_reason,
        allow_auto_reply=bool(plan.allow_auto_reply),
    )


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
        tickets: TicketSettings,
        *,
        dry_run: bool = False,
        on_evaluation: Callable[[Evaluation], None] | None = None,
    ) -> None:
        self.current = current
        self.tickets = tickets
        self.dry_run = dry_run
        self.on_evaluation = on_evaluation

    def __call__(self, mail: IncomingMail, session: Session) -> Decision:
        rules = self.current()
        evaluation = evaluate(rules, mail, explain=self.on_evaluation is not None)
        if self.on_evaluation:
            self.on_evaluation(evaluation)
        return decide(evaluation, rules, mail, session, self.tickets, dry_run=self.dry_run)
