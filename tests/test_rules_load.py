"""Validation: every kind of error reads `file:line:column: dotted.key: problem` (config.py's one
format), names the rule and says the problem in plain words; warnings for rules that can never
match; the shipped rules.yaml is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules.load import RulesError, load_rules
from tests.rulesets import shipped_rules, write_rules

ROOT = Path(__file__).resolve().parents[1]

HEAD = """\
people: [yamada, sato]
teams:
  sales: {members: [yamada, sato]}
categories: [inquiry, order]
priorities: [normal, high]
rules:
"""  # rules start on line 7


def problems(tmp_path: Path, rules: str) -> list[str]:
    path = write_rules(tmp_path, HEAD + rules, with_people=False)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


def test_unknown_assignee_suggests_the_close_name(tmp_path):
    found = problems(
        tmp_path,
        """\
  - name: phone
    when: {source_kind: phone}
    then:
      assignee: yamda
""",
    )
    assert found == [
        "10:7: rules.0.then.assignee: rule `phone`: unknown assignee `yamda` — did you mean "
        "`yamada`?"
    ]


def test_unknown_category_priority_and_team_member(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "people: [yamada]\n"
        "teams:\n"
        "  sales: {members: [yamada, satoo]}\n"
        "categories: [inquiry, order]\n"
        "priorities: [normal, high]\n"
        "rules:\n"
        "  - name: a\n"
        "    when: {always: true}\n"
        "    then: {category: ordr, priority: urgent}\n",
        encoding="utf-8",
    )
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:29: teams.sales.members.1: unknown person `satoo`; known: `yamada`",
        f"{path}:9:12: rules.0.then.category: rule `a`: unknown category `ordr` — did you mean "
        "`order`?",
        f"{path}:9:28: rules.0.then.priority: rule `a`: unknown priority `urgent`; known: "
        "`normal`, `high`",
    ]


def test_empty_when(tmp_path):
    found = problems(tmp_path, "  - name: nothing\n    when:\n    then: {category: order}\n")
    assert found == [
        "8:5: rules.0.when: rule `nothing`: empty `when`: give a condition (`always: true` "
        "matches every mail)"
    ]


def test_empty_any_list_and_empty_nested_condition(tmp_path):
    found = problems(
        tmp_path,
        "  - name: a\n    when: {any: []}\n    then: {category: order}\n"
        "  - name: b\n    when: {not: {}}\n    then: {category: order}\n",
    )
    assert found[0] == (
        "8:12: rules.0.when.any: rule `a`: an empty list matches nothing; give at least one "
        "condition"
    )
    assert found[1].startswith("11:12: rules.1.when.not: rule `b`: empty condition")


def test_unknown_key_suggests_the_known_one(tmp_path):
    found = problems(
        tmp_path,
        "  - name: typo\n    when:\n      subjet: {contains: 至急}\n    then: {category: order}\n",
    )
    assert found == ["9:7: rules.0.when.subjet: rule `typo`: unknown key — did you mean `subject`?"]


def test_did_you_mean_offers_the_keys_allowed_at_that_place(tmp_path):
    """`contans` under a text test suggests `contains`, a key of that test, and a key of the
    business hours suggests one of theirs."""
    found = problems(
        tmp_path,
        "  - {name: a, when: {subject: {contans: 至急}}, then: {category: order}}\n"
        "business_hours: {weekday: [mon]}\n",
    )
    assert found == [
        "7:32: rules.0.when.subject.contans: rule `a`: unknown key — did you mean `contains`?",
        "8:18: business_hours.weekday: unknown key — did you mean `weekdays`?",
    ]


def test_bad_regex_is_refused_with_re2s_reason(tmp_path):
    found = problems(
        tmp_path,
        "  - name: lookbehind\n"
        "    when: {subject: {regex: '(?<=見積)書'}}\n"
        "    then: {category: order}\n",
    )
    assert found == [
        "8:22: rules.0.when.subject.regex: rule `lookbehind`: bad regular expression "
        "`(?<=見積)書`: invalid perl operator: (?<="
    ]


def test_name_must_be_kebab_case_and_unique(tmp_path):
    found = problems(
        tmp_path,
        "  - {name: Fax_Orders, when: {always: true}, then: {category: order}}\n"
        "  - {name: dup, when: {always: true}, then: {category: order, continue: true}}\n"
        "  - {name: dup, when: {always: true}, then: {category: order}}\n",
    )
    assert found == [
        "7:6: rules.0.name: rule `Fax_Orders`: rule names are kebab-case (lower-case words "
        "joined by -), not `Fax_Orders`"
    ]
    found = problems(
        tmp_path,
        "  - {name: dup, when: {always: true}, then: {category: order, continue: true}}\n"
        "  - {name: dup, when: {always: true}, then: {category: order}}\n",
    )
    assert found == ["8:6: rules.1.name: rule `dup`: duplicate rule name (rule #1 has it too)"]


def test_bad_values_in_plain_words(tmp_path):
    found = problems(
        tmp_path,
        "  - name: a\n"
        "    when: {source_kind: facs}\n"
        "    then: {due_in: tomorrow, assignee: {team: sales, strategy: random}}\n",
    )
    assert found == [
        "8:12: rules.0.when.source_kind: rule `a`: unknown source kind `facs` — did you mean "
        "`fax`?; known: phone, fax, webform, email",
        "9:12: rules.0.then.due_in: rule `a`: `tomorrow` is not a due time: write e.g. `4h`, "
        "`1d`, `30m`, `4 business hours` or `next_business_day 10:00`",
        "9:54: rules.0.then.assignee.strategy: rule `a`: `random` is not allowed here: write "
        "'fixed', 'round_robin' or 'least_open'",
    ]


def test_missing_then_and_strategy_on_a_person(tmp_path):
    assert problems(tmp_path, "  - name: a\n    when: {always: true}\n") == [
        "7:5: rules.0.then: rule `a`: required key is missing"
    ]
    found = problems(
        tmp_path,
        "  - {name: a, when: {always: true}, then: {assignee: {team: sato, strategy: fixed}}}\n",
    )
    assert found == [
        "7:44: rules.0.then.assignee: rule `a`: `sato` is a person; `strategy` applies to teams "
        "only"
    ]


def test_invalid_yaml_names_line_and_column(tmp_path):
    found = problems(tmp_path, "  - name: a\n    when: {subject: [unclosed\n")
    assert len(found) == 1 and found[0].startswith("9:1: invalid YAML")


def test_catch_all_makes_later_rules_unreachable_warning(tmp_path):
    path = write_rules(
        tmp_path,
        HEAD + "  - {name: tag, when: {always: true}, then: {labels: [all], continue: true}}\n"
        "  - {name: everything, when: {always: true}, then: {category: order, assignee: sales}}\n"
        "  - {name: never, when: {subject: 見積}, then: {category: order}}\n",
        with_people=False,
    )
    rules = load_rules(path)
    assert rules.warnings == [
        f"{path}:9:5: rules.2: rule `never`: can never match: rule `everything` before it "
        "matches every mail"
    ]


def test_shipped_rules_file_is_valid_without_warnings():
    rules = shipped_rules()
    assert rules.warnings == []
    assert {"answering-service-callback", "fax-order", "web-form"} <= {r.name for r in rules.rules}
