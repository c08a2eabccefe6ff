"""An index of the rules by what they test, so routing a mail only tries the rules it could match.

For each rule a *guard* is derived from its `when`: a set of probes of which at least one must
hit for the rule to hold (a necessary condition, never a sufficient one). A probe is an exact
value of a field (`from.domain` = `example.com`, `source_kind` = `fax`: one dict lookup) or a
pattern searched in a field's values (`contains`/`starts_with`/`ends_with` as escaped literals
on the folded text, `regex` as written on the raw text). All patterns on one field form one RE2
`Filter` (FilteredRE2: one pass of literal atoms, then only the regexes whose atoms occur are
run, each by its own RE2 as `compile_regex` would), so 100 body regexes cost one scan of the
body, not 100.

`all` and a mapping of several keys take the most selective guard of their parts; `any` takes
the union of its parts' guards, and has none if one part has none; `not`, `always`, flags,
`auth`, `business_hours` and `attachment: false` give no guard. A rule without a guard is
tried for every mail. The candidates are then evaluated in file order with their full
condition, so the result is the linear evaluation's: a rule the index skips could not hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import re2

from config import re2_options
from rules.conditions import Facts, fold
from rules.schema import AttachmentTest, Condition, TextTest

# A probe: (selector, kind, value). kind "exact": the folded value equals `value`;
# "folded"/"raw": the pattern `value` is found in the folded/raw text.
Probe = tuple[str, str, str]
Guard = list[Probe]


def _text_guard(selector: str, test: TextTest) -> Guard | None:
    """The cheapest necessary probe set of one TextTest (its operators must all hold)."""
    options: list[Guard] = []
    if test.equals is not None:
        options.append([(selector, "exact", fold(test.equals))])
    if test.in_ is not None:
        options.append([(selector, "exact", fold(v)) for v in test.in_])
    if test.contains:
        options.append([(selector, "folded", re2.escape(fold(p))) for p in test.contains])
    if test.starts_with:
        options.append(
            [(selector, "folded", r"\A" + re2.escape(fold(p))) for p in test.starts_with]
        )
    if test.ends_with:
        options.append([(selector, "folded", re2.escape(fold(p)) + r"\z") for p in test.ends_with])
    if test.regex is not None:
        options.append([(selector, "raw", test.regex)])
    return _best(options)


def _cost(guard: Guard) -> tuple[int, int]:
    return (0 if all(kind == "exact" for _, kind, _ in guard) else 1, len(guard))


def _best(options: Sequence[Guard | None]) -> Guard | None:
    """Of guards that must all hold, the one that lets fewest rules through: exact values first."""
    known = [g for g in options if g is not None]
    return min(known, key=_cost) if known else None


def _attachment_guard(test: AttachmentTest) -> Guard | None:
    if not test.present:
        return None
    return _best(
        [
            _text_guard("attachment.type", test.type) if test.type else None,
            _text_guard("attachment.name", test.name) if test.name else None,
        ]
    )


def guard_of(cond: Condition) -> Guard | None:
    """A necessary condition of `cond` as probes (one must hit), or None if there is none."""
    parts: list[Guard | None] = []
    if cond.all_:
        parts.append(_best([guard_of(c) for c in cond.all_]))
    if cond.any_:
        alternatives = [guard_of(c) for c in cond.any_]
        if all(g is not None for g in alternatives):
            parts.append([probe for g in alternatives if g for probe in g])
    for label, address in (("from", cond.from_), ("to", cond.to)):
        if address and address.address:
            parts.append(_text_guard(f"{label}.address", address.address))
        if address and address.domain:
            parts.append(_text_guard(f"{label}.domain", address.domain))
    for label, test in (
        ("subject", cond.subject),
        ("body", cond.body),
        ("source_kind", cond.source_kind),
    ):
        if test:
            parts.append(_text_guard(label, test))
    if cond.header:
        parts.append(_text_guard(f"header:{cond.header.name}", cond.header))
    if cond.field:
        parts.append(_text_guard(f"field:{cond.field.name}", cond.field))
    if cond.attachment:
        parts.append(_attachment_guard(cond.attachment))
    return _best(parts)


@dataclass
class _PatternGroup:
    """All patterns searched in one field (folded or raw), as one RE2 Filter."""

    patterns: list[str] = field(default_factory=list)
    owners: list[list[int]] = field(default_factory=list)  # rule positions per pattern
    all_owners: set[int] = field(default_factory=set)
    filter: re2.Filter | None = None

    def add(self, pattern: str, position: int) -> None:
        if pattern in self.patterns:
            self.owners[self.patterns.index(pattern)].append(position)
        else:
            self.patterns.append(pattern)
            self.owners.append([position])
        self.all_owners.add(position)

    def compile(self) -> None:
        self.filter = re2.Filter()
        for pattern in self.patterns:
            self.filter.Add(pattern, re2_options())
        self.filter.Compile()

    def hits(self, text: str, found: set[int]) -> None:
        assert self.filter is not None
        try:
            matched = self.filter.Match(text)
        except UnicodeEncodeError:  # a lone surrogate: let the rules' own checks decide
            found.update(self.all_owners)
            return
        for i in matched or ():
            found.update(self.owners[i])


class RuleIndex:
    """Which rules (by position in the file) a mail could match; see the module docstring."""

    def __init__(self, conditions: Sequence[Condition]) -> None:
        self.unguarded: list[int] = []
        self.exact: dict[str, dict[str, list[int]]] = {}
        self.groups: dict[tuple[str, str], _PatternGroup] = {}
        for position, cond in enumerate(conditions):
            guard = guard_of(cond)
            if guard is None:
                self.unguarded.append(position)
                continue
            for selector, kind, value in guard:
                if kind == "exact":
                    table = self.exact.setdefault(selector, {})
                    table.setdefault(value, []).append(position)
                else:
                    self.groups.setdefault((selector, kind), _PatternGroup()).add(value, position)
        for group in self.groups.values():
            group.compile()

    def candidates(self, facts: Facts) -> list[int]:
        """Positions of the rules that could hold for the mail, in file order."""
        found = set(self.unguarded)
        for selector, table in self.exact.items():
            for value in facts.texts(selector)[1]:
                found.update(table.get(value, ()))
        for (selector, kind), group in self.groups.items():
            raw, folded = facts.texts(selector)
            for text in folded if kind == "folded" else raw:
                group.hits(text, found)
        return sorted(found)
