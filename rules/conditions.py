"""Conditions of the rules file compiled to small node objects, and the facts they look at.

`node.failure(facts)` returns None when the node holds, else the node that made it fail, which
can `describe` the failure in plain words; so routing does no string work for misses unless an
explanation is asked for.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from config import compile_regex
from ingest.authres import trusted_results, verdicts
from ingest.mail import IncomingMail
from rules.calendar import Calendar
from rules.schema import AttachmentTest, AuthTest, Condition, SuggestedTest, TextTest


def fold(text: str) -> str:
    """Fold case and width so ＦＡＸ, Fax and fax compare equal, as do ｶﾅ and カナ."""
    return unicodedata.normalize("NFKC", text).casefold()


def _show(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"`{text[:limit]}…`" if len(text) > limit else f"`{text}`"


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


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
        self.decided_by: str | None = None  # the rule that decided, once one has (the engine's)

    def texts(self, selector: str) -> tuple[list[str], list[str]]:
        """The values under `selector` as written and normalised (see `fold`)."""
        found = self._texts.get(selector)
        if found is None:
            raw = self._raw(selector)
            found = self._texts[selector] = (raw, [fold(v) for v in raw])
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
        """Verdicts per method from the Authentication-Results our MTA wrote (ingest.authres)."""
        if self._auth is None:
            self._auth = verdicts(trusted_results(self.parsed.headers, self.authserv_id))
        return self._auth


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
            wanted = fold(test.equals)
            ops.append((f"equals `{test.equals}`", lambda _r, n: n == wanted))
        if test.contains:
            parts = [fold(p) for p in test.contains]
            ops.append(
                (
                    f"contains any of {_quoted(test.contains)}",
                    lambda _r, n: any(p in n for p in parts),
                )
            )
        if test.starts_with:
            starts = tuple(fold(p) for p in test.starts_with)
            ops.append(
                (f"starts with {_quoted(test.starts_with)}", lambda _r, n: n.startswith(starts))
            )
        if test.ends_with:
            ends = tuple(fold(p) for p in test.ends_with)
            ops.append((f"ends with {_quoted(test.ends_with)}", lambda _r, n: n.endswith(ends)))
        if test.regex is not None:
            pattern = compile_regex(test.regex)
            ops.append((f"matches /{test.regex}/", lambda r, _n: pattern.search(r) is not None))
        if test.in_ is not None:
            allowed = {fold(v) for v in test.in_}
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


class SuggestedCheck:
    """The triage model's suggestion names the wanted category/assignee, likely enough."""

    def __init__(self, test: SuggestedTest) -> None:
        self.category = fold(test.category) if test.category else None
        self.assignee = fold(test.assignee) if test.assignee else None
        self.min_probability = test.min_probability
        wanted = [f"category `{test.category}`"] if test.category else []
        wanted += [f"assignee `{test.assignee}`"] if test.assignee else []
        at_least = f" with probability >= {test.min_probability:g}" if test.min_probability else ""
        self.summary = f"suggested {' and '.join(wanted) or 'anything'}{at_least}"

    def failure(self, facts: Facts) -> Node | None:
        found = facts.mail.suggestion
        if found is None:
            return self
        checks: list[tuple[str | None, str | None, float]] = []
        if self.category or not self.assignee:
            checks.append((self.category, found.category, found.category_probability))
        if self.assignee:
            checks.append((self.assignee, found.assignee, found.assignee_probability))
        for wanted, label, probability in checks:
            if wanted is not None and fold(label or "") != wanted:
                return self
            if probability < self.min_probability:
                return self
        return None

    def describe(self, facts: Facts) -> str:
        found = facts.mail.suggestion
        if found is None:
            return f"no suggestion (no triage model stored); wanted: {self.summary}"
        return (
            f"suggested category `{found.category}` ({found.category_probability:.2f}), "
            f"assignee `{found.assignee}` ({found.assignee_probability:.2f}); "
            f"wanted: {self.summary}"
        )


class NoRuleMatched:
    """No rule above has decided (matched without `continue: true`): a final fallback."""

    summary = "no rule matched"

    def failure(self, facts: Facts) -> Node | None:
        return None if facts.decided_by is None else self

    def describe(self, facts: Facts) -> str:
        return f"rule `{facts.decided_by}` decided first; wanted: no rule matched"


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
    if cond.no_rule_matched:
        parts.append(NoRuleMatched())
    if cond.suggested:
        parts.append(SuggestedCheck(cond.suggested))
    return parts[0] if len(parts) == 1 else AllOf(parts)
