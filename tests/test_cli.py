"""The `mailintake` command line, run in-process (CliRunner) and as a real process."""

from __future__ import annotations

import json
import mailbox
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from cli import app
from storage import db
from tests.conftest import DATA, corpus_dir
from tests.mails import simple_mail
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(db_url, monkeypatch):
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", db_url)
    runner = CliRunner()

    def run(*args: str, input: bytes | None = None):
        return runner.invoke(app, ["--config", str(ROOT / "config.yaml"), *args], input=input)

    return run


def scalar(db_url: str, sql: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar_one()
    finally:
        engine.dispose()


def test_ingest_then_list_and_show_as_json(cli):
    result = cli("ingest", str(DATA / "answering-service-iso2022jp.eml"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ticket"] == 1
    listed = json.loads(cli("tickets", "list", "--json").stdout)
    assert [t["key"] for t in listed] == ["INQ-1"]
    shown = json.loads(cli("tickets", "show", "INQ-1", "--json").stdout)
    assert "㈱髙島屋ワイン" in shown["body"]
    message = json.loads(cli("messages", "show", "1", "--json").stdout)
    assert (message["status"], message["source"]) == ("ticket", "file")


@pytest.mark.slow
def test_redmine_corpus_ingests_without_loss_and_twice_makes_no_ticket(cli, db_url):
    folder = corpus_dir("redmine")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix == ".eml"]
    first = cli("ingest", str(folder), "--glob", "*.eml", "--json")
    summary = json.loads(first.stdout)
    assert summary["read"] == len(files) == scalar(db_url, "SELECT count(*) FROM inbound_messages")
    fates = ("ticket", "comment", "duplicate", "dropped", "failed")
    assert sum(summary[f] for f in fates) == len(files)
    assert scalar(db_url, "SELECT count(*) FROM inbound_messages WHERE status = 'received'") == 0
    assert first.exit_code == (1 if summary["failed"] else 0)
    tickets = scalar(db_url, "SELECT count(*) FROM tickets")
    second = json.loads(cli("ingest", str(folder), "--glob", "*.eml", "--json").stdout)
    assert scalar(db_url, "SELECT count(*) FROM tickets") == tickets
    assert second["ticket"] == 0
    assert second["duplicate"] == summary["ticket"] + summary["comment"] + summary["duplicate"]


def test_mbox_maildir_and_stdin(cli, tmp_path, db_url):
    box = mailbox.mbox(tmp_path / "in.mbox")
    for n in range(3):
        box.add(simple_mail(subject=f"mbox {n}"))
    box.close()
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    maildir.add(simple_mail(subject="maildir"))
    result = cli("ingest", str(tmp_path / "in.mbox"), str(tmp_path / "Maildir"), "--json")
    assert json.loads(result.stdout)["ticket"] == 4
    piped = cli("ingest", "-", "--json", input=simple_mail(subject="piped"))
    assert json.loads(piped.stdout)["ticket"] == 1
    assert scalar(db_url, "SELECT count(*) FROM inbound_messages WHERE source = 'stdin'") == 1


def test_failed_message_makes_exit_code_1(cli, tmp_path):
    (tmp_path / "empty.eml").write_bytes(b"\r\n")
    result = cli("ingest", str(tmp_path / "empty.eml"), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failed"] == 1


def test_mta_pipe_exits_0_once_stored_even_if_processing_fails(cli, db_url):
    result = cli("ingest", "-", "--json", input=b"\r\n")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["failed"] == 1
    assert scalar(db_url, "SELECT count(*) FROM inbound_messages WHERE status = 'failed'") == 1


def test_mta_pipe_exits_75_tempfail_when_it_cannot_store(monkeypatch):
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    args = ["--config", str(ROOT / "config.yaml"), "ingest", "-"]
    result = CliRunner().invoke(app, args, input=simple_mail())
    assert result.exit_code == 75
    assert "the sender should retry" in result.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tickets:\n  key_prefix: 'lower'\n")
    result = CliRunner().invoke(app, ["--config", str(path), "tickets", "list"])
    assert result.exit_code == 2
    assert f"{path}:2:3: tickets.key_prefix" in result.stderr


def test_missing_path_exits_2(cli):
    result = cli("ingest", "/nonexistent/file.eml")
    assert result.exit_code == 2
    assert "/nonexistent/file.eml: no such file" in result.stderr


def test_unreachable_database_exits_3(monkeypatch):
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    result = CliRunner().invoke(app, ["--config", str(ROOT / "config.yaml"), "tickets", "list"])
    assert result.exit_code == 3
    assert "database unavailable" in result.stderr


@pytest.mark.slow
def test_sigkill_mid_ingest_then_rerun_processes_every_message_once(db_url, tmp_path):
    total = 400
    box = mailbox.mbox(tmp_path / "big.mbox")
    for n in range(total):
        box.add(simple_mail(subject=f"bulk {n}", message_id=f"<bulk-{n}@example.com>"))
    box.close()
    env = {**os.environ, "MAILINTAKE_DATABASE__URL": db_url}
    command = [sys.executable, "-c", "import cli; cli.main()", "ingest", str(tmp_path / "big.mbox")]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    wait_for(
        lambda: (
            proc.poll() is not None or scalar_or_zero(db_url, "SELECT count(*) FROM tickets") >= 20
        ),
        "the first 20 tickets of the ingest to be killed",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = scalar(db_url, "SELECT count(*) FROM inbound_messages")
    assert 0 < killed_at < total, "the kill should land in the middle of the ingest"
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert scalar(db_url, "SELECT count(*) FROM tickets") == total
    assert scalar(db_url, "SELECT count(DISTINCT origin_key) FROM tickets") == total
    assert scalar(db_url, "SELECT count(*) FROM inbound_messages WHERE status = 'received'") == 0


def scalar_or_zero(db_url: str, sql: str) -> int:
    try:
        return scalar(db_url, sql)
    except Exception:
        return 0  # the child may not have created the schema yet


def test_human_output_prints_brackets_literally(cli):
    cli("ingest", "-", input=simple_mail(subject="[要確認] 在庫 [bold]red[/bold]"))
    shown = cli("tickets", "show", "INQ-1")
    assert shown.exit_code == 0, shown.output
    assert "subject: [要確認] 在庫 [bold]red[/bold]" in shown.stdout


def test_messages_list_filters_by_status_and_since(cli):
    cli("ingest", "-", input=simple_mail())
    cli("ingest", "-", input=b"\r\n")
    failed = json.loads(cli("messages", "list", "--status", "failed", "--json").stdout)
    assert [m["status"] for m in failed] == ["failed"]
    recent = json.loads(cli("messages", "list", "--since", "1h", "--json").stdout)
    assert len(recent) == 2
    future = json.loads(cli("messages", "list", "--since", "2999-01-01", "--json").stdout)
    assert future == []
    assert cli("messages", "list", "--since", "yesterday").exit_code == 2


def test_mta_pipe_exits_0_when_stored_but_the_database_fails_afterwards(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'pipe.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    with engine.begin() as conn:  # the ledger accepts the row, then refuses every update
        conn.execute(
            text(
                "CREATE TRIGGER refuse_updates BEFORE UPDATE ON inbound_ledger "
                "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
            )
        )
    engine.dispose()
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", url)
    args = ["--config", str(ROOT / "config.yaml"), "ingest", "-"]
    result = CliRunner().invoke(app, args, input=simple_mail())
    assert result.exit_code == 0, result.output
    assert "stored as ledger id 1; processing deferred" in result.stderr
    assert scalar(url, "SELECT count(*) FROM inbound_messages WHERE status = 'received'") == 1


def test_mta_pipe_exits_75_on_a_bad_configuration(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("database:\n  ulr: typo\n")
    result = CliRunner().invoke(app, ["--config", str(bad), "ingest", "-"], input=simple_mail())
    assert result.exit_code == 75
    assert f"{bad}:2:3: database.ulr: unknown key" in result.stderr
