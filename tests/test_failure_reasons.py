"""A failure's reason is shown as the driver's message, never as SQLAlchemy's
"[SQL parameters hidden ...]" line, and never with the SQL or the parameters."""

from __future__ import annotations

import json
import logging

from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from cli import app
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.context import PipelineContext
from pipeline.process import process
from storage.states import Fate
from tests.mails import simple_mail


def disk_problem(mail):
    raise IntegrityError(
        "INSERT INTO tickets (body) VALUES (?)",
        {"body": "お客様の個人情報"},
        Exception("simulated disk problem"),
        hide_parameters=True,
    )


def test_failed_list_shows_the_drivers_message(tmp_path, db_url, settings, sessions, caplog):
    pipeline = PipelineContext(settings, sessions, disk_problem)
    inbound_id = receive(sessions, simple_mail(), Envelope(source="file"))
    with caplog.at_level(logging.WARNING, logger="pipeline.process"):
        assert process(pipeline, inbound_id) == Fate.FAILED
    (line,) = [r.getMessage() for r in caplog.records if "failed at" in r.getMessage()]
    assert line.endswith("IntegrityError: Exception: simulated disk problem")
    assert "INSERT" not in line and "個人情報" not in line

    config = tmp_path / "config.yaml"
    config.write_text(f"database: {{url: '{db_url}'}}\n", encoding="utf-8")
    listed = CliRunner().invoke(app, ["--config", str(config), "failed", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert "simulated disk problem" in row["error"]
    assert "hidden" not in row["error"] and "INSERT" not in row["error"]
    shown = CliRunner().invoke(
        app, ["--config", str(config), "messages", "show", str(inbound_id), "--json"]
    )
    history = json.loads(shown.stdout)["history"]
    assert "simulated disk problem" in history[-1]["error"]
