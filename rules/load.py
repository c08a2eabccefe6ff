"""Read and check a rules file. Every problem names the file, line, column and rule, in words an
operator understands (`unknown assignee `yamda` — did you mean `yamada`?`).

The version of the rules is the sha256 of the exact bytes that were parsed, so a file that changes
while it is being read can never produce rules labelled with the wrong version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml.error import YAMLError

from config import ConfigError, parse_yaml
from rules.engine import CompiledRules
from rules.schema import Actions, RulesFile, did_you_mean, known_keys

Loc = tuple[int | str, ...]


@dataclass(frozen=True)
class Problem:
    path: Path
    line: int | None
    column: int | None
    rule: str | None
    message: str

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.path, self.line, self.column) if p is not None)
        rule = f"rule `{self.rule}`: " if self.rule else ""
        return f"{where}: {rule}{self.message}"


class RulesError(Exception):
    """A rules file that must not be used; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def position(data: Any, loc: Loc) -> tuple[int | None, int | None]:
    """1-based line and column of the deepest part of `loc` present in ruamel `data`.

    Parts that are not in the data (pydantic's names for validators or union members) are
    skipped, so a location like ('rules', 0, 'then', 'assignee', 'team') still lands on the line.
    """
    line = column = None
    node = data
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if isinstance(part, str) and hasattr(node, "keys") and part in node:
                line, column = lc.key(part) if lc else (None, None)
            elif isinstance(part, int) and isinstance(node, list) and part < len(node):
                line, column = lc.item(part) if lc else (None, None)
            else:
                continue
        except (KeyError, IndexError, TypeError):
            continue
        node = node[part]
    return (line + 1, column + 1) if line is not None and column is not None else (None, None)


def rule_name(data: Any, loc: Loc) -> str | None:
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        try:
            name = data["rules"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return None


def _plain(err: Any) -> str:
    """Pydantic's message in plain words."""
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        return f"unknown key `{key}`{did_you_mean(key, known_keys())}"
    if kind == "missing":
        return f"missing key `{err['loc'][-1]}`"
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    if kind == "literal_error":
        return f"`{err['input']}` is not allowed here: write {err['ctx']['expected']}"
    if kind == "string_pattern_mismatch" and err["loc"][-1] == "name":
        return "rule names are kebab-case (lower-case words joined by -)"
    return str(err["msg"])


def _validation_problems(exc: ValidationError, data: Any, path: Path) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line, column = position(data, loc)
        problems.append(Problem(path, line, column, rule_name(data, loc), _plain(err)))
    return by_position(problems)


def by_position(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0))


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
                yield ("teams", team_name, "members", index), f"team `{team_name}`: {message}"
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


def _warnings(model: RulesFile, data: Any, path: Path) -> list[Problem]:
    """Legal but probably wrong: rules after a catch-all, people and teams nobody routes to."""
    found = []
    catch_all = next(
        (r for r in model.rules if r.when.is_catch_all() and not r.then.continue_), None
    )
    if catch_all is not None:
        for index, rule in enumerate(model.rules):
            if index > model.rules.index(catch_all):
                line, column = position(data, ("rules", index))
                message = f"can never match: rule `{catch_all.name}` before it matches every mail"
                found.append(Problem(path, line, column, rule.name, message))
    used = {a.assignee.name for a in [model.defaults, *(r.then for r in model.rules)] if a.assignee}
    members = {m for name, team in model.teams.items() if name in used for m in team.members}
    for name in [*model.people, *model.teams]:
        if name not in used and name not in members:
            section = "people" if name in model.people else "teams"
            line, column = position(data, (section, name))
            found.append(Problem(path, line, column, None, f"`{name}` is never assigned"))
    return found


def read_rules(path: Path) -> tuple[bytes, Any]:
    """The file's bytes and its YAML (ruamel round-trip, with positions)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        raise RulesError([Problem(path, None, None, None, message)]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([Problem(path, None, None, None, f"not UTF-8: {exc}")]) from exc
    try:
        return raw, parse_yaml(text, path)
    except ConfigError as exc:
        cause = exc.__cause__
        mark = getattr(cause, "problem_mark", None) if isinstance(cause, YAMLError) else None
        problem = getattr(cause, "problem", None) or str(exc)
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise RulesError([Problem(path, line, column, None, f"invalid YAML: {problem}")]) from exc


def load_rules(path: Path) -> CompiledRules:
    """Read, validate and compile a rules file; RulesError lists everything wrong with it."""
    raw, data = read_rules(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RulesError([Problem(path, 1, 1, None, "the top level must be a mapping")])
    try:
        model = RulesFile.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_validation_problems(exc, data, path)) from None
    problems = [
        Problem(path, *position(data, loc), rule_name(data, loc), message)
        for loc, message in _cross_problems(model)
    ]
    if problems:
        raise RulesError(by_position(problems))
    lines = [position(data, ("rules", i))[0] for i in range(len(model.rules))]
    compiled = CompiledRules.build(model, path, hashlib.sha256(raw).hexdigest(), lines)
    compiled.warnings = [str(w) for w in _warnings(model, data, path)]
    return compiled
