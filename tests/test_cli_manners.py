"""The command line refuses bad filter values with exit 2 and the valid choices, and every
`--json` command prints one JSON document on stdout, errors included."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app
from tests.rulesets import OUR_MTA


@pytest.fixture
def run(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/m.db'}}\nauthserv_id: {OUR_MTA}\n",
        encoding="utf-8",
    )

    def invoke(*args: str):
        return CliRunner().invoke(app, ["--config", str(config), *args])

    return invoke


@pytest.mark.parametrize(
    ("args", "choice"),
    [
        (("messages", "list", "--status", "bogus"), "dropped"),
        (("tickets", "list", "--status", "bogus"), "open"),
        (("failed", "list", "--stage", "bogus"), "follow_up"),
        (("failed", "list", "--source", "carrier-pigeon"), "imap"),
        (("failed", "replay", "--all", "--source", "carrier-pigeon"), "lmtp"),
    ],
)
def test_a_bad_filter_value_is_refused_with_the_choices(run, args, choice):
    result = run(*args)
    assert result.exit_code == 2
    assert choice in result.output


@pytest.mark.parametrize("command", [("tickets", "list"), ("messages", "list"), ("failed", "list")])
def test_a_negative_limit_is_refused(run, command):
    assert run(*command, "--limit", "-1").exit_code == 2


def test_rules_check_json_prints_the_errors_as_json(run, tmp_path):
    broken = tmp_path / "rules.yaml"
    broken.write_text("rules:\n  - name: x\n    when: {subjekt: a}\n    then: {priority: high}\n")
    result = run("rules", "check", str(broken), "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert any("subjekt" in error for error in document["errors"])


def test_rules_test_writes_nothing_not_even_a_database_file(run, tmp_path):
    from tests.conftest import DATA

    result = run("rules", "test", str(DATA / "answering-service.eml"), "--rules", "rules.yaml")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "m.db").exists()
