"""`mailintake triage train|eval`, the suggestion in `rules test`, the summary in `tickets list`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.triage_corpus import generate, load_history
from cli import app
from config import Settings
from storage import db
from tests.mails import simple_mail
from tests.rulesets import OUR_MTA
from tests.test_triage import CORKED, pipeline_with_rules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(db_url, monkeypatch):
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", db_url)
    monkeypatch.setenv("MAILINTAKE_RULES__PATH", str(ROOT / "rules.yaml"))
    monkeypatch.setenv("MAILINTAKE_TEMPLATES__PATH", str(ROOT / "templates.yaml"))
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["--config", str(ROOT / "config.yaml"), *args])

    return run


def test_nothing_to_learn_from_is_exit_1_and_a_bad_since_exit_2(cli):
    result = cli("triage", "train")
    assert result.exit_code == 1
    assert "nothing stored: need tickets of at least two categories" in result.output
    result = cli("triage", "train", "--since", "lately")
    assert result.exit_code == 2
    assert "--since" in result.output


def test_eval_train_then_rules_test_shows_the_suggestion(cli, db_url, tmp_path):
    engine = db.make_engine(db_url)
    ctx = pipeline_with_rules(Settings(database={"url": db_url}), db.make_session_factory(engine))
    load_history(ctx, generate(300, seed=5, end=datetime.now(UTC), authserv_id=OUR_MTA))
    engine.dispose()

    result = cli("triage", "eval", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["trained_on"], report["tested_on"]) == (240, 60)
    category = report["targets"]["category"]
    assert category["model"]["accuracy"] > category["most_common"]["accuracy"]
    assert category["rules"] is not None
    result = cli("triage", "eval")
    assert "category: accuracy / macro F1" in result.output
    assert "rows the truth" in result.output

    result = cli("triage", "train", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == 1

    sample = tmp_path / "corked.eml"
    sample.write_bytes(simple_mail("届いた商品について", CORKED))
    result = cli("rules", "test", str(sample))
    assert result.exit_code == 0, result.output
    assert "suggestion (triage model v1): category complaint" in " ".join(result.output.split())
    explained = json.loads(cli("rules", "test", str(sample), "--json").stdout)[0]
    assert explained["decision"]["category"] == "inquiry"  # the rules' own decision
    assert explained["suggestion"]["category"] == "complaint"
    assert explained["suggestion"]["model_version"] == 1

    result = cli("ingest", str(sample))
    assert result.exit_code == 0, result.output
    listed = json.loads(cli("tickets", "list", "--limit", "1", "--json").stdout)[0]
    assert listed["summary"] == "届いたシャブリ 2022のコルクが沈んでいました。"
    shown = json.loads(cli("tickets", "show", listed["key"], "--json").stdout)
    assert shown["category"] == "inquiry"
    assert shown["suggestion"]["category"] == "complaint"
    assert cli("tickets", "show", listed["key"]).exit_code == 0
