"""Failed messages: list, show, export, replay (also racing), discard, automatic retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli import app
from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from pipeline.replay import SKIPPED, parse_since, replay, retry_due
from pipeline.retry import is_transient
from sources.service import ProcessingWorker
from storage import db
from storage.models import InboundMessage, ProcessingAttempt, Ticket
from storage.states import Fate
from tests.mails import UNFETCHED_REASON, add_unfetched_row, simple_mail
from tests.waiting import WAIT_SECONDS, wait_for

ROOT = Path(__file__).resolve().parents[1]
FILE = Envelope(source="file")
NOT_MAIL = b"\r\n\r\n"


@pytest.fixture
def cli(db_url: str, tmp_path: Path):
    """Run `mailintake --config <temp config on the test database> ...` in-process."""
    config = tmp_path / "config.yaml"
    config.write_text(f"database:\n  url: {db_url}\n", encoding="utf-8")
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["--config", str(config), *args])

    return run


def rule_exploded(mail):
    raise RuntimeError("rule exploded")


def fail_one(settings: Settings, sessions: sessionmaker[Session], raw: bytes, router=None) -> int:
    """Receive `raw` and process it with a router that raises (or `router`); returns its id."""
    ctx = PipelineContext(settings, sessions, router or rule_exploded)
    inbound_id = receive(sessions, raw, FILE)
    assert process(ctx, inbound_id) == Fate.FAILED
    return inbound_id


def count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def row(sessions: sessionmaker[Session], inbound_id: int) -> InboundMessage:
    with sessions() as session:
        return session.get_one(InboundMessage, inbound_id)


def test_failure_is_listed_then_replay_makes_exactly_one_ticket(cli, settings, sessions):
    inbound_id = fail_one(settings, sessions, simple_mail(subject="【電話受付】在庫の確認"))

    listed = cli("failed", "list", "--json")
    assert listed.exit_code == 0, listed.output
    [item] = json.loads(listed.stdout)
    assert (item["id"], item["stage"], item["attempts"]) == (inbound_id, "route", 1)
    assert item["error"] == "RuntimeError: rule exploded"
    assert item["subject"] == "【電話受付】在庫の確認"
    assert item["from"] == "customer@example.com"

    # The cause is fixed: the CLI routes with today's default rules.
    first = cli("failed", "replay", str(inbound_id), "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["fates"]["ticket"] == 1
    assert count(sessions, Ticket) == 1

    again = cli("failed", "replay", str(inbound_id), "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["fates"][SKIPPED] == 1
    everything = cli("failed", "replay", "--all", "--json")
    assert json.loads(everything.stdout)["selected"] == 0
    assert count(sessions, Ticket) == 1
    assert json.loads(cli("failed", "list", "--json").stdout) == []

    history = json.loads(cli("messages", "show", str(inbound_id), "--json").stdout)["history"]
    assert [(h["outcome"], h["stage"]) for h in history] == [("failed", "route"), ("ticket", None)]
    assert history[0]["pid"] == os.getpid()


def test_list_filters_by_stage_error_source_and_since(cli, settings, sessions):
    parse_failure = fail_one(settings, sessions, NOT_MAIL)
    route_failure = fail_one(settings, sessions, simple_mail())

    def ids(*options: str) -> list[int]:
        result = cli("failed", "list", "--json", *options)
        assert result.exit_code == 0, result.output
        return [item["id"] for item in json.loads(result.stdout)]

    assert ids() == [route_failure, parse_failure]
    assert ids("--stage", "parse") == [parse_failure]
    assert ids("--error", "RULE EXPLODED") == [route_failure]
    assert ids("--error", "100%_") == []
    assert ids("--source", "file", "--since", "1h") == [route_failure, parse_failure]
    assert ids("--source", "smtp") == []
    assert ids("--since", "2999-01-01") == []
    bad = cli("failed", "list", "--since", "yesterday")
    assert bad.exit_code == 2
    assert "--since: 'yesterday' is neither a duration" in bad.stderr


def test_replay_exits_1_while_a_message_still_fails(cli, settings, sessions):
    inbound_id = fail_one(settings, sessions, NOT_MAIL)
    result = cli("failed", "replay", "--stage", "parse", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["selected"], summary["still_failed"]) == (1, [inbound_id])
    assert row(sessions, inbound_id).attempts == 2


def test_replay_usage_and_missing_ids(cli, settings, sessions):
    inbound_id = fail_one(settings, sessions, simple_mail())
    assert cli("failed", "replay").exit_code == 2
    assert cli("failed", "replay", str(inbound_id), "--all").exit_code == 2
    assert cli("failed", "replay", "abc").exit_code == 2
    dry = cli("failed", "replay", "--all", "--dry-run", "--json")
    assert dry.exit_code == 0
    assert json.loads(dry.stdout)["messages"] == [{"id": inbound_id, "status": "failed"}]
    assert row(sessions, inbound_id).status == "failed"
    missing = cli("failed", "replay", "999", "--json")
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)["missing"] == [999]
    assert cli("failed", "replay", "999", "--dry-run").exit_code == 1


def test_show_gives_envelope_headers_traceback_and_history(cli, settings, sessions):
    raw = simple_mail(subject="見積依頼", message_id="<show-1@example.com>")
    inbound_id = fail_one(settings, sessions, raw)
    result = cli("failed", "show", "<show-1@example.com>", "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    message_keys = json.loads(cli("messages", "show", str(inbound_id), "--json").stdout).keys()
    assert set(view) == message_keys | {"envelope", "headers", "raw_purged"}
    assert (view["id"], view["status"], view["fail_stage"]) == (inbound_id, "failed", "route")
    assert view["envelope"] == {}
    assert ["Subject", "見積依頼"] in view["headers"]
    assert view["error"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: rule exploded" in view["error"]
    [attempt] = view["history"]
    assert set(attempt) == {
        "attempted_at", "outcome", "stage", "error", "host", "pid", "username", "command"
    }  # fmt: skip
    text_view = cli("failed", "show", str(inbound_id))
    assert text_view.exit_code == 0
    assert "rule exploded" in text_view.stdout
    assert cli("failed", "show", "424242").exit_code == 1


def test_export_writes_the_exact_raw_bytes(cli, settings, sessions, tmp_path):
    raw = b"Subject: =?ISO-2022-JP?B?GyRCJCIbKEI=?=\r\nX-Odd: \xff\xfe\r\n\r\nbody\r\n"
    inbound_id = fail_one(settings, sessions, raw)
    target = tmp_path / "case.eml"
    result = cli("failed", "export", str(inbound_id), "-o", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == raw
    assert cli("failed", "export", str(inbound_id)).stdout_bytes == raw
    assert cli("failed", "export", "999").exit_code == 1
    unwritable = cli("failed", "export", str(inbound_id), "-o", str(tmp_path / "no" / "x.eml"))
    assert unwritable.exit_code == 2


def test_discard_keeps_the_row_and_is_never_replayed(cli, settings, sessions):
    raw = simple_mail()
    inbound_id = fail_one(settings, sessions, raw)
    assert cli("failed", "discard", str(inbound_id)).exit_code == 2  # --reason is required
    assert cli("failed", "discard", str(inbound_id), "--reason", " ").exit_code == 2
    result = cli("failed", "discard", str(inbound_id), "--reason", "spam test", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["discarded"] == [inbound_id]

    message = row(sessions, inbound_id)
    assert (message.status, message.discard_reason, message.raw) == ("discarded", "spam test", raw)
    assert "rule exploded" in (message.error or "")
    assert json.loads(cli("failed", "list", "--json").stdout) == []
    assert json.loads(cli("failed", "replay", "--all", "--json").stdout)["selected"] == 0
    assert json.loads(cli("failed", "replay", str(inbound_id), "--json").stdout)["fates"] == {
        **dict.fromkeys(("ticket", "comment", "duplicate", "dropped", "failed"), 0),
        "discarded": 0,
        SKIPPED: 1,
        "missing": 0,
    }
    assert count(sessions, Ticket) == 0

    twice = cli("failed", "discard", str(inbound_id), "999", "--reason", "again", "--json")
    assert twice.exit_code == 1
    assert json.loads(twice.stdout) == {
        "discarded": [],
        "not_failed": [inbound_id],
        "missing": [999],
    }
    history = json.loads(cli("messages", "show", str(inbound_id), "--json").stdout)["history"]
    assert [h["outcome"] for h in history] == ["failed", "discarded"]


def replay_in_thread(db_url: str, settings: Settings, ids: list[int], start: threading.Barrier):
    """A replay with its own engine, as a second process would have."""
    engine = db.make_engine(db_url)
    outcomes: dict[int, str] = {}

    def run() -> None:
        ctx = PipelineContext(settings, db.make_session_factory(engine))
        start.wait()
        outcomes.update(replay(ctx, ids).outcomes)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcomes, engine


def test_two_racing_replays_make_one_ticket_per_message(db_url, settings, sessions):
    ids = [fail_one(settings, sessions, simple_mail(subject=f"race {n}")) for n in range(20)]
    start = threading.Barrier(2)
    runs = [replay_in_thread(db_url, settings, ids, start) for _ in range(2)]
    for thread, _, engine in runs:
        thread.join(timeout=WAIT_SECONDS)
        engine.dispose()
    first, second = (outcomes for _, outcomes, _ in runs)
    assert sorted(first) == sorted(second) == ids
    for inbound_id in ids:
        assert sorted((first[inbound_id], second[inbound_id])) == [SKIPPED, "ticket"]
    assert count(sessions, Ticket) == len(ids)
    with sessions() as session:
        tickets = session.scalar(select(func.count(func.distinct(Ticket.inbound_message_id))))
    assert tickets == len(ids)


@pytest.mark.slow
def test_two_replay_processes_racing_make_one_ticket_per_message(db_url, settings, sessions):
    ids = [fail_one(settings, sessions, simple_mail(subject=f"proc {n}")) for n in range(30)]
    env = {**os.environ, "MAILINTAKE_DATABASE__URL": db_url, "MAILINTAKE_CONFIG": "/dev/null"}
    argv = [sys.executable, "-c", "import cli; cli.main()", "failed", "replay", "--all", "--json"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE) for _ in range(2)]
    summaries = [json.loads(p.communicate(timeout=WAIT_SECONDS)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(s["fates"]["ticket"] for s in summaries) == len(ids)
    assert count(sessions, Ticket) == len(ids)
    assert all(row(sessions, i).status == "ticket" for i in ids)


def lock_timeout_router(db_url: str) -> tuple:
    """A rule that runs into a real lock timeout: another connection holds the row the rule
    wants to update (PostgreSQL: lock_timeout; SQLite: busy timeout). The pipeline's own
    transaction has only read when the rule runs (its `claim` comes after routing)."""
    other: Engine = db.make_engine(db_url, busy_timeout_ms=100)
    update = text("UPDATE inbound_ledger SET attempts = attempts WHERE id = :id")

    def router(mail):
        with other.begin() as holder:  # as another process's open transaction would
            holder.execute(update, {"id": mail.inbound_id})
            with other.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SET LOCAL lock_timeout = '100ms'"))
                conn.execute(update, {"id": mail.inbound_id})
        raise AssertionError("the update should have timed out")

    return router, other


def test_transient_failure_retries_itself_with_backoff_until_attempts_run_out(
    db_url, settings, sessions
):
    settings.retry.max_attempts = 3
    router, other = lock_timeout_router(db_url)
    try:
        locked = PipelineContext(settings, sessions, router)
        inbound_id = fail_one(settings, sessions, simple_mail(), router)
        first = row(sessions, inbound_id)
        assert first.fail_stage == "route"
        assert first.next_attempt_at is not None and first.processed_at is not None
        assert first.next_attempt_at - first.processed_at == timedelta(seconds=60)

        fixed = PipelineContext(settings, sessions)
        assert retry_due(fixed, now=first.processed_at).outcomes == {}  # not due yet

        assert retry_due(locked, now=first.next_attempt_at).outcomes == {inbound_id: "failed"}
        second = row(sessions, inbound_id)
        assert second.attempts == 2
        assert second.next_attempt_at - second.processed_at == timedelta(seconds=120)

        assert retry_due(locked, now=second.next_attempt_at).outcomes == {inbound_id: "failed"}
        third = row(sessions, inbound_id)
        assert (third.attempts, third.next_attempt_at) == (3, None)  # a human decides now
        assert retry_due(fixed, now=third.processed_at + timedelta(days=365)).outcomes == {}
    finally:
        other.dispose()
    assert replay(fixed, [inbound_id]).outcomes == {inbound_id: "ticket"}
    assert row(sessions, inbound_id).next_attempt_at is None
    assert count(sessions, ProcessingAttempt) == 4


def test_the_serve_worker_retries_transient_failures_by_itself(db_url, settings, sessions):
    settings.retry.backoff_seconds = 0.05
    router, other = lock_timeout_router(db_url)
    try:
        inbound_id = fail_one(settings, sessions, simple_mail(), router)
    finally:
        other.dispose()
    rule_failure = fail_one(settings, sessions, simple_mail())
    worker = ProcessingWorker(PipelineContext(settings, sessions), rescan_seconds=0.05)
    worker.start()
    try:
        wait_for(
            lambda: row(sessions, inbound_id).status != "failed", "the transient failure retried"
        )
    finally:
        assert worker.stop(timeout=WAIT_SECONDS)
    assert row(sessions, inbound_id).status == "ticket"
    assert row(sessions, rule_failure).status == "failed"  # waits for a human


def test_deterministic_failures_wait_for_a_human(settings, sessions):
    parse_failure = fail_one(settings, sessions, NOT_MAIL)
    rule_failure = fail_one(settings, sessions, simple_mail())
    assert row(sessions, parse_failure).next_attempt_at is None
    assert row(sessions, rule_failure).next_attempt_at is None
    fixed = PipelineContext(settings, sessions)
    later = row(sessions, rule_failure).processed_at + timedelta(days=365)
    assert retry_due(fixed, now=later).outcomes == {}


def test_only_lock_and_connection_errors_count_as_transient(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(OperationalError) as no_table, engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
    finally:
        engine.dispose()
    assert not is_transient(no_table.value)
    assert not is_transient(RuntimeError("rule exploded"))
    unreachable = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/x")
    try:
        with pytest.raises(OperationalError) as refused, unreachable.connect():
            pass
    finally:
        unreachable.dispose()
    assert is_transient(refused.value)


def test_since_accepts_durations_and_iso_dates():
    tokyo = ZoneInfo("Asia/Tokyo")
    now = parse_since("2026-11-26T12:00:00+09:00", tokyo)
    assert parse_since("2d", tokyo, now) == now - timedelta(days=2)
    assert parse_since("90s", tokyo, now) == now - timedelta(seconds=90)
    assert parse_since("2026-11-20", tokyo).isoformat() == "2026-11-20T00:00:00+09:00"
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last week", tokyo)


def test_outdated_schema_exits_3_and_downgrade_keeps_discarded_rows(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    command.upgrade(db.alembic_config(engine), "0001")
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", url)
    result = CliRunner().invoke(app, ["--config", "/dev/null", "failed", "list"])
    assert result.exit_code == 3
    assert "mailintake db upgrade" in result.stderr

    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    inbound_id = fail_one(Settings(database={"url": url}), sessions, NOT_MAIL)
    with sessions.begin() as session:
        session.execute(text("UPDATE inbound_ledger SET status = 'discarded'"))
    command.downgrade(db.alembic_config(engine), "0001")
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM inbound_messages")).scalar_one()
    assert (inbound_id, status) == (1, "failed")
    engine.dispose()


def test_replay_counts_a_never_fetched_message_as_still_failed(cli, sessions):
    inbound_id = add_unfetched_row(sessions)
    result = cli("failed", "replay", "--all", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["still_failed"] == [inbound_id]
    assert row(sessions, inbound_id).error == UNFETCHED_REASON
    assert cli("failed", "discard", str(inbound_id), "--reason", "saved by hand").exit_code == 0
    assert cli("failed", "replay", "--all").exit_code == 0  # nothing left that fails


def test_list_and_show_decode_raw_8bit_headers(cli, settings, sessions):
    raw = "From: 山田 <yamada@example.jp>\r\nSubject: 見積書の件\r\n\r\n本文\r\n".encode("cp932")
    inbound_id = fail_one(settings, sessions, raw)
    [item] = json.loads(cli("failed", "list", "--json").stdout)
    assert (item["from"], item["subject"]) == ("山田 <yamada@example.jp>", "見積書の件")
    shown = json.loads(cli("failed", "show", str(inbound_id), "--json").stdout)
    assert ["Subject", "見積書の件"] in shown["headers"]
