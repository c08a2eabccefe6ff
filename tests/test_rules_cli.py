"""`mailintake rules check|test|diff` and ingest routed by the shipped rules.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "answering-service-iso2022jp.eml": ("phone", "yamada", "high", "callback"),
    "fax-gateway-pdf.eml": ("fax", "sato", "normal", "order"),
    "contact-form7-plain.eml": ("webform", "suzuki", "low", "web-inquiry"),
}


@pytest.fixture
def cli(shipped_cli):
    return shipped_cli


def test_check_summarises_the_shipped_rules(cli):
    result = cli("rules", "check", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["teams"]["sales"]["strategy"] == "round_robin"
    assert {"yamada", "sato", "suzuki"} <= set(summary["people"])
    assert summary["warnings"] == []


def test_check_exits_1_naming_each_error_and_prints_warnings(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    head = (
        "people: [yamada]\nrules:\n  - {name: a, when: {always: true}, then: {assignee: yamda}}\n"
    )
    bad.write_text(head, encoding="utf-8")
    result = cli("rules", "check", str(bad))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert (
        f"{bad}:3:44: rules.0.then.assignee: rule `a`: unknown assignee `yamda` — did you mean "
        "`yamada`?"
    ) in text
    bad.write_text(head + "  - {name: b, when: {subject: {regex: '(?<=x)'}}, then: {}}\n")
    result = cli("rules", "check", str(bad))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert (
        f"{bad}:4:32: rules.1.when.subject.regex: rule `b`: bad regular expression `(?<=x)`: "
        "invalid perl operator"
    ) in text
    assert f"{bad}:4:51: rules.1.then: rule `b`: empty `then`" in text
    unreachable = tmp_path / "warn.yaml"
    unreachable.write_text(
        "people: [yamada]\nrules:\n"
        "  - {name: a, when: {always: true}, then: {assignee: yamada}}\n"
        "  - {name: b, when: {subject: x}, then: {assignee: yamada}}\n",
        encoding="utf-8",
    )
    result = cli("rules", "check", str(unreachable))
    assert result.exit_code == 0
    assert "can never match: rule `a` before it matches every mail" in result.output


def test_rules_test_routes_the_three_sources_differently_and_explains_every_rule(cli):
    files = [str(DATA / name) for name in SOURCES]
    result = cli("rules", "test", *files, "--json", "--received-at", "2026-11-24T01:00:00Z")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    for item, (kind, assignee, priority, category) in zip(results, SOURCES.values(), strict=True):
        decision = item["decision"]
        assert item["source_kind"] == kind
        assert (decision["assignee"], decision["priority"], decision["category"]) == (
            assignee,
            priority,
            category,
        )
        assert len(item["rules"]) == 8  # every rule explained
        applied = [r["rule"] for r in item["rules"] if r["result"] == "applied"]
        assert applied == decision["rule_hits"]
        missed = [r for r in item["rules"] if r["result"] == "missed"]
        assert all(r["reason"] for r in missed)
    # the test wrote nothing
    listed = json.loads(cli("messages", "list", "--json").stdout)
    assert listed == []


def test_rules_test_text_output_says_why(cli):
    result = cli("rules", "test", str(DATA / "fax-gateway-pdf.eml"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "✓ applied fax-order" in text
    assert "✗ missed answering-service-callback" in text
    assert "source_kind is `fax`; wanted: equals `phone`" in text
    assert "assignee: sato" in text


def test_ingest_routes_by_rules_and_diff_lists_what_an_edit_changes(cli, tmp_path):
    result = cli("ingest", *(str(DATA / name) for name in SOURCES), "--json")
    assert result.exit_code == 0, result.output
    tickets = json.loads(cli("tickets", "list", "--json").stdout)
    assert {t["source_kind"]: t["assignee"] for t in tickets} == {
        "phone": "yamada",
        "fax": "sato",
        "webform": "suzuki",
    }
    edited = tmp_path / "rules.yaml"
    edited.write_text(
        (ROOT / "rules.yaml")
        .read_text(encoding="utf-8")
        .replace(
            "category: order\n      assignee: sato", "category: order\n      assignee: suzuki"
        ),
        encoding="utf-8",
    )
    result = cli("rules", "diff", str(edited), "--since", "1d", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["replayed"] == 3
    [change] = report["changed"]
    fax_ticket = next(t["key"] for t in tickets if t["source_kind"] == "fax")
    assert change["ticket"] == fax_ticket
    assert change["changes"] == {"assignee": {"current": "sato", "new": "suzuki"}}
