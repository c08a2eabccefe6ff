"""`mailintake templates test` explains which template a mail matches and each field found or
missed; `templates suggest` drafts a template from sample mails that then extracts a new one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from ingest.extract import extract_fields, load_templates, matching_template
from ingest.parse import parse
from ingest.suggest import labelled_lines, shared_labels
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "templates.yaml"
# A second answering service: its own domain and subject, the shipped one's labelled layout.
SAMPLES = [DATA / f"other-answering-service-{n}.eml" for n in (1, 2, 3)]
FOURTH = DATA / "other-answering-service-4.eml"


@pytest.fixture
def run(tmp_path, monkeypatch):
    """The command line with the shipped config; a database it must not need is unreachable."""
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", f"sqlite:///{tmp_path}/absent/x.db")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["--config", str(ROOT / "config.yaml"), *args])

    return invoke


def test_the_shipped_templates_miss_the_other_service(run):
    result = run("templates", "test", str(FOURTH), "--json")
    assert result.exit_code == 1, result.output
    [report] = json.loads(result.stdout)
    assert report["template"] is None
    tried = {t["template"]: t["conditions"] for t in report["tried"]}
    assert tried["answering-service"] == {"sender": False, "subject": False}


def test_templates_test_shows_every_field_found_or_missed(run):
    result = run("templates", "test", str(DATA / "answering-service-iso2022jp.eml"))
    assert result.exit_code == 0, result.output
    assert "✓ matched answering-service" in result.stdout
    assert "✓ requester_phone: 03-1234-5678 → requester_phone_e164=+81312345678" in result.stdout
    assert "✗ requester_kana missed" in result.stdout
    assert "✗ call_id missed (pattern in subject" in result.stdout


def test_templates_test_json_lists_each_spec(run):
    result = run("templates", "test", str(DATA / "answering-service.eml"), "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)
    assert report["template"] == "answering-service"
    assert report["source_kind"] == "phone"
    by_key = {f["key"]: f for f in report["fields"]}
    assert by_key["requester_phone"]["found"] is True
    assert by_key["requester_phone"]["values"]["requester_phone_e164"] == "+819012345678"
    assert report["requester"]["company"] == "株式会社サクラ酒販"
    assert report["extracted"]["call_id"] == "A-1024"


def test_a_suggested_template_loads_and_extracts_a_fourth_mail(run, tmp_path):
    result = run("templates", "suggest", *map(str, SAMPLES), "--templates", str(SHIPPED))
    assert result.exit_code == 0, result.output
    draft = tmp_path / "templates.yaml"
    draft.write_text(result.stdout, encoding="utf-8")
    [template] = load_templates(draft)
    assert template.match.sender == ["*@himawari-call.example.org"]
    assert template.bound_to is not None and template.bound_to.dkim == ["himawari-call.example.org"]
    assert template.source_kind == "phone"
    fourth = parse(FOURTH.read_bytes())
    assert matching_template([template], fourth) is template
    fields = extract_fields(template, fourth)
    assert fields["received_at"] == "2026-12-04T16:30:00+09:00"
    assert fields["requester_company"] == "合同会社さくら酒店"
    assert fields["requester_name"] == "加藤 恵"
    assert fields["requester_phone_e164"] == "+81666667777"
    assert (
        fields["topic"]
        == "請求書の再発行をお願いしたいとのことです。\n宛名は会社名でお願いします。"
    )
    assert fields["call_id"] == "K-2004"
    # The shipped answering service's mails are not taken by the draft.
    assert (
        matching_template([template], parse((DATA / "answering-service.eml").read_bytes())) is None
    )


def test_without_known_templates_the_draft_types_fields_by_their_values(run, tmp_path):
    empty = tmp_path / "none.yaml"
    empty.write_text("templates: []\n", encoding="utf-8")
    result = run("templates", "suggest", *map(str, SAMPLES), "--templates", str(empty), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["samples"] == 3
    types = {f["labels"][0]: f.get("type", "text") for f in shown["template"]["fields"]}
    assert types == {
        "受付日時": "datetime",
        "会社名": "text",
        "お名前": "text",
        "フリガナ": "text",
        "電話番号": "phone",
        "ご用件": "text",
        "受付番号": "text",
    }
    draft = tmp_path / "draft.yaml"
    draft.write_text(shown["yaml"], encoding="utf-8")
    [template] = load_templates(draft)
    fields = extract_fields(template, parse(FOURTH.read_bytes()))
    assert fields["phone_e164"] == "+81666667777"


def test_samples_sharing_no_labelled_line_draft_nothing(run, tmp_path):
    result = run(
        "templates",
        "suggest",
        str(DATA / "reply-japanese-quoted.eml"),
        str(DATA / "smtp-webform-html.eml"),
    )
    assert result.exit_code == 1
    assert "share no labelled line" in result.stderr


def test_footer_lines_and_sentences_are_not_labels():
    mails = [parse(p.read_bytes()) for p in SAMPLES]
    labels = [seen.label for seen in shared_labels(mails)]
    assert "電話代行サービス" not in labels  # the signature: same value in every sample
    assert all("https" not in label for label in labels)
    assert labelled_lines("https://example.org/a:b\n12:30 の件\n") == []
