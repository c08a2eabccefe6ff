"""Read and check a rules file. Every problem names the file, line, column, key and rule, in
words an operator understands (`rules.yaml:12:7: rules.2.then.assignee: rule `phone`: unknown
assignee `yamda` — did you mean `yamada`?`): the file is loaded by config.load_yaml_model, and
the checks that need the whole file are formatted by the same YamlSource.

The version of the rules is the sha256 of the exact bytes that were parsed, so a file that changes
while it is being read can never produce rules labelled with the wrong version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from config import (
    DEFAULT_TIMEZONE,
    ConfigError,
    Loc,
    Problem,
    YamlSource,
    did_you_mean,
    load_yaml_model,
    position,
    zone_named,
)
from rules.engine import CompiledRules
from rules.schema import Actions, Condition, RulesFile


class RulesError(ConfigError):
    """A rules file that must not be used; `problems` lists every error found, in file order."""


def rule_name(data: Any, loc: Loc) -> str | None:
    """`rule `x`` for a location inside the rule named x."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        try:
            name = data["rules"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return f"rule `{name}`" if isinstance(name, str) else None
    return None


def by_position(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=Problem.sort_key)


def _unknown(kind: str, name: str, known: list[str]) -> str | None:
    """`unknown category `x` — did you mean `y`?`, or None if `name` is known."""
    if name in known:
        return None
    hint = did_you_mean(name, known) or (
        f"; known: {', '.join(f'`{k}`' for k in known)}" if known else f"; no {kind}s are defined"
    )
    return f"unknown {kind} `{name}`{hint}"


def _action_problems(model: RulesFile, actions: Actions) -> Iterator[tuple[str, str]]:
    """(key, message) for names in `actions` the file does not define."""
    checks = [
        ("category", actions.category, model.categories),
        ("priority", actions.priority, model.priorities),
    ]
    for key, value, known in checks:
        if value is not None and known:
            message = _unknown(key, value, known)
            if message:
                yield key, message
    ref = actions.assignee
    if ref is None:
        return
    assignees = [*model.people, *model.teams]
    message = _unknown("assignee", ref.name, assignees)
    if message:
        yield "assignee", message
    elif ref.strategy and ref.name in model.people:
        yield "assignee", f"`{ref.name}` is a person; `strategy` applies to teams only"


def _cross_problems(model: RulesFile) -> Iterator[tuple[Loc, str]]:
    """Problems that need the whole file: names used in one place and defined in another."""
    for name in set(model.people) & set(model.teams):
        yield ("teams", name), f"`{name}` is both a person and a team"
    for team_name, team in model.teams.items():
        for index, member in enumerate(team.members):
            message = _unknown("person", member, list(model.people))
            if message:
                yield ("teams", team_name, "members", index), message
    for key, message in _action_problems(model, model.defaults):
        yield ("defaults", key), message
    first_line: dict[str, int] = {}
    for index, rule in enumerate(model.rules):
        if rule.name in first_line:
            first = first_line[rule.name]
            yield ("rules", index, "name"), f"duplicate rule name (rule #{first} has it too)"
        first_line.setdefault(rule.name, index + 1)
        for key, message in _action_problems(model, rule.then):
            yield ("rules", index, "then", key), message


def _auth_tests(cond: Condition, loc: Loc) -> Iterator[Loc]:
    """Where `cond` (at `loc`) or a condition inside it tests `auth`."""
    if cond.auth is not None:
        yield (*loc, "auth")
    for key, parts in (("all", cond.all_), ("any", cond.any_)):
        for index, part in enumerate(parts or []):
            yield from _auth_tests(part, (*loc, key, index))
    if cond.not_ is not None:
        yield from _auth_tests(cond.not_, (*loc, "not"))


NO_AUTHSERV_ID = (
    "tests `auth`, but no `authserv_id` is configured, so no Authentication-Results header can "
    "be trusted: set `authserv_id` in config.yaml (or MAILINTAKE_AUTHSERV_ID) to the "
    "authserv-id your MTA writes, the first word of its Authentication-Results headers "
    "(docs/deploy.md, Behind Postfix)"
)


def _auth_problems(model: RulesFile, authserv_id: str | None) -> Iterator[tuple[Loc, str]]:
    if authserv_id:
        return
    for index, rule in enumerate(model.rules):
        for loc in _auth_tests(rule.when, ("rules", index, "when")):
            yield loc, NO_AUTHSERV_ID


def auth_without_authserv_id(path: Path, authserv_id: str | None) -> list[Problem]:
    """Each `auth` test in the rules file at `path` that cannot work because `authserv_id` (the
    configuration's) is not set, as `file:line:column: key: rule `x`: ...` problems; none when
    it is set or nothing tests `auth` (or when the file does not load at all: `load_rules`
    reports that). `load_rules` refuses a file with any of these; `doctor` shows them."""
    try:
        model, source = load_yaml_model(path, RulesFile, about=rule_name)
    except ConfigError:
        return []
    return [source.problem(loc, message) for loc, message in _auth_problems(model, authserv_id)]


def _warnings(model: RulesFile, source: YamlSource) -> list[Problem]:
    """Legal but probably wrong: rules after a catch-all, people and teams nobody routes to."""
    found = []
    catch_all = next(
        (r for r in model.rules if r.when.is_catch_all() and not r.then.continue_), None
    )
    if catch_all is not None:
        for index, _rule in enumerate(model.rules):
            if index > model.rules.index(catch_all):
                message = f"can never match: rule `{catch_all.name}` before it matches every mail"
                found.append(source.problem(("rules", index), message))
    used = {a.assignee.name for a in [model.defaults, *(r.then for r in model.rules)] if a.assignee}
    members = {m for name, team in model.teams.items() if name in used for m in team.members}
    for name in [*model.people, *model.teams]:
        if name not in used and name not in members:
            section = "people" if name in model.people else "teams"
            found.append(source.problem((section, name), f"`{name}` is never assigned"))
    return found


def load_rules(
    path: Path, zone: ZoneInfo | str = DEFAULT_TIMEZONE, authserv_id: str | None = None
) -> CompiledRules:
    """Read, validate and compile a rules file; RulesError lists everything wrong with it.

    `zone` is the service's time zone (config `timezone`): business hours are kept in it.
    `authserv_id` (config `authserv_id`) names the MTA whose Authentication-Results count;
    a rule that tests `auth` without it is refused.
    """
    context = {"zone": zone if isinstance(zone, ZoneInfo) else zone_named(zone)}
    try:
        model, source = load_yaml_model(path, RulesFile, context=context, about=rule_name)
    except ConfigError as exc:
        raise RulesError(*exc.problems) from None
    found = [*_cross_problems(model), *_auth_problems(model, authserv_id)]
    problems = [source.problem(loc, message) for loc, message in found]
    if problems:
        raise RulesError(*by_position(problems))
    lines = [position(source.data, ("rules", i))[0] for i in range(len(model.rules))]
    version = hashlib.sha256(source.raw).hexdigest()
    compiled = CompiledRules.build(model, path, version, lines, authserv_id)
    compiled.warnings = [str(w) for w in _warnings(model, source)]
    return compiled
