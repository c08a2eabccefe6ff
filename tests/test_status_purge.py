"""`status`, `stats` and `purge` on a seeded store, on SQLite and PostgreSQL: what each reports,
and that retention drops only the bytes of final messages, keeping every row."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli import app
from config import Settings
from ingest.intake import receive
from pipeline.process import PipelineContext, process
from rules.engine import RulesRouter
from storage import repo
from storage.models import (
    Attachment,
    AttachmentBlob,
    InboundMessage,
    InboundRaw,
    Ticket,
    utcnow,
)
from storage.states import Fate
from tests.mails import add_unfetched_row, simple_mail
from tests.rulesets import OUR_MTA, shipped_rules
from tests.test_failed import FILE, fail_one

ROOT = Path(__file__).resolve().parents[1]
PDF_ALONE = b"%PDF-1.4 only the old ticket has this"
PDF_SHARED = b"%PDF-1.4 an old and a new ticket both have this"


@pytest.fixture
def cli(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("MAILINTAKE_DATABASE__URL", raising=False)
    config = tmp_path / "config.yaml"
    rules = ROOT / "rules.yaml"
    config.write_text(
        f"authserv_id: {OUR_MTA}\ndatabase: {{url: {db_url}}}\nrules: {{path: {rules}}}\n", "utf-8"
    )

    def run(*args: str, code: int = 0) -> Any:
        result = CliRunner().invoke(app, ["--config", str(config), *args])
        assert result.exit_code == code, result.output
        return result

    return run


def run_json(cli: Any, *args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


def make_old(sessions: sessionmaker[Session], *ids: int, days: int = 200) -> None:
    """Move messages, and the tickets they made, `days` into the past."""
    then = utcnow() - timedelta(days=days)
    with sessions.begin() as session:
        session.execute(
            update(InboundMessage).where(InboundMessage.id.in_(ids)).values(received_at=then)
        )
        session.execute(
            update(Ticket).where(Ticket.inbound_message_id.in_(ids)).values(created_at=then)
        )


class Store:
    """A store holding one message of each kind retention must tell apart."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.rules = shipped_rules()
        ctx = PipelineContext(settings, sessions, RulesRouter(lambda: self.rules))
        old_mail = simple_mail("old", attachments=[("a.pdf", "application/pdf", PDF_ALONE)])
        shared = [("s.pdf", "application/pdf", PDF_SHARED)]

        def ticket(raw: bytes) -> int:
            inbound_id = receive(sessions, raw, FILE)
            assert process(ctx, inbound_id) in (Fate.TICKET, Fate.DUPLICATE)
            return inbound_id

        self.ticket = ticket

        self.old_ticket = ticket(old_mail)
        self.old_duplicate = ticket(old_mail)
        self.old_shared = ticket(simple_mail("old, shared", attachments=shared))
        self.old_failed = fail_one(settings, sessions, simple_mail("old, failed"))
        self.old_backlog = receive(sessions, simple_mail("old, waiting"), FILE)
        self.unfetched = add_unfetched_row(sessions)
        self.new_ticket = ticket(simple_mail("new, shared", attachments=shared))
        make_old(
            sessions,
            self.old_ticket,
            self.old_duplicate,
            self.old_shared,
            self.old_failed,
            self.old_backlog,
        )

    def bytes_now(self) -> dict[str, bytes]:
        with self.sessions() as session:
            raws = session.execute(select(InboundRaw.inbound_message_id, InboundRaw.raw))
            blobs = session.execute(select(AttachmentBlob.sha256, AttachmentBlob.content))
            return {f"raw {i}": bytes(r) for i, r in raws} | {s: bytes(c) for s, c in blobs}

    def attachment_id(self, inbound_id: int) -> int:
        with self.sessions() as session:
            query = select(Attachment.id).where(Attachment.inbound_message_id == inbound_id)
            return session.scalars(query).one()


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> Store:
    return Store(Settings(), sessions)


def test_status_reports_backlog_failures_retries_sources_checkpoints(
    cli: Any, store: Store, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        repo.schedule_retry(session, store.old_failed, utcnow() - timedelta(minutes=1))
        repo.save_imap_checkpoint(session, "inquiry", "INBOX", 42, 7)
    status = run_json(cli, "status")
    assert status["backlog"] == 1
    assert status["oldest_unprocessed_age_seconds"] >= 200 * 86400
    assert status["by_status"]["ticket"] == 3
    assert status["by_status"]["duplicate"] == 1
    assert status["failed_by_stage"] == {"route": 1, "fetch": 1}
    assert (status["retries_scheduled"], status["retries_due"]) == (1, 1)
    assert status["last_by_source"]["file"]["id"] == store.new_ticket
    assert status["last_by_source"]["imap"]["id"] == store.unfetched
    checkpoint = status["imap_checkpoints"][0]
    assert (checkpoint["account"], checkpoint["uidvalidity"], checkpoint["last_uid"]) == (
        "inquiry",
        42,
        7,
    )
    assert status["last_ticket"]["rules_version"] == store.rules.version
    shown = cli("status").stdout
    assert "backlog: 1" in shown and "route=1" in shown and "fetch=1" in shown


def test_a_retry_scheduled_later_is_not_due(
    cli: Any, store: Store, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        repo.schedule_retry(session, store.old_failed, utcnow() + timedelta(hours=1))
    status = run_json(cli, "status")
    assert (status["retries_scheduled"], status["retries_due"]) == (1, 0)


def test_stats_count_what_arrived_since(cli: Any, store: Store) -> None:
    recent = run_json(cli, "stats", "--since", "1d")
    assert recent["by_source"] == {"file": 1, "imap": 1}
    assert recent["by_fate"] == {"ticket": 1, "failed": 1}
    assert recent["by_category"] == {"inquiry": 1}
    assert recent["by_assignee"] == {"yamada": 1}
    everything = run_json(cli, "stats", "--since", "1000d")
    assert sum(everything["by_source"].values()) == 7
    assert everything["by_fate"] == {
        "ticket": 3,
        "duplicate": 1,
        "failed": 2,
        "received": 1,
    }
    assert "yamada" in cli("stats", "--since", "1w").stdout
    assert "--since" in cli("stats", "--since", "yesterday", code=2).stderr


def test_purge_dry_run_changes_nothing(cli: Any, store: Store) -> None:
    before = store.bytes_now()
    plan = run_json(cli, "purge", "--raw-older-than", "180d")
    assert plan["dry_run"] is True
    assert plan["messages"] == 3
    assert (plan["first_id"], plan["last_id"]) == (store.old_ticket, store.old_shared)
    assert (plan["attachment_blobs"], plan["attachment_bytes"]) == (1, len(PDF_ALONE))
    assert store.bytes_now() == before
    assert "give --yes" in cli("purge", "--raw-older-than", "180d").stdout
    assert store.bytes_now() == before


def test_purge_drops_bytes_of_final_messages_only(
    cli: Any, store: Store, sessions: sessionmaker[Session]
) -> None:
    before = store.bytes_now()
    done = run_json(cli, "purge", "--raw-older-than", "180d", "--yes")
    assert (done["emptied_messages"], done["emptied_blobs"]) == (3, 1)
    after = store.bytes_now()
    emptied = {k for k in before if before[k] != after[k]}
    purged_raw = {f"raw {i}" for i in (store.old_ticket, store.old_duplicate, store.old_shared)}
    alone = repo_sha(PDF_ALONE)
    assert emptied == purged_raw | {alone}
    assert all(after[k] == b"" for k in emptied)
    with sessions() as session:
        row = session.get_one(InboundMessage, store.old_ticket)
        assert row.raw_purged and row.size == len(before[f"raw {store.old_ticket}"])
        assert row.sha256 == repo_sha(before[f"raw {store.old_ticket}"])
        assert row.status == Fate.TICKET
        failed = session.get_one(InboundMessage, store.old_failed)
        assert not failed.raw_purged and failed.raw
        blob = session.get_one(AttachmentBlob, alone)
        assert blob.size == len(PDF_ALONE)
        view_rows = session.execute(text("SELECT count(*) FROM inbound_messages")).scalar()
        assert view_rows == 7
    again = run_json(cli, "purge", "--raw-older-than", "180d", "--yes")
    assert (again["messages"], again["attachment_blobs"]) == (0, 0)


def test_a_new_message_brings_purged_attachment_bytes_back(
    cli: Any, store: Store, sessions: sessionmaker[Session]
) -> None:
    cli("purge", "--raw-older-than", "180d", "--yes")
    alone = repo_sha(PDF_ALONE)
    assert store.bytes_now()[alone] == b""
    again = simple_mail("the same PDF again", attachments=[("a.pdf", "application/pdf", PDF_ALONE)])
    store.ticket(again)
    assert store.bytes_now()[alone] == PDF_ALONE


def repo_sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_purged_messages_and_attachments_say_so(cli: Any, store: Store, tmp_path: Path) -> None:
    cli("purge", "--raw-older-than", "180d", "--yes")
    ref = str(store.old_ticket)
    assert "dropped by retention" in cli("failed", "export", ref, code=1).stderr
    shown = run_json(cli, "failed", "show", ref)
    assert shown["raw_purged"] is True and shown["headers"] == []
    assert "purged by retention" in cli("failed", "show", ref).stdout
    attachment = str(store.attachment_id(store.old_ticket))
    saved = cli("attachments", "save", attachment, "-o", str(tmp_path / "a.pdf"), code=1)
    assert "dropped by retention" in saved.stderr
    assert not (tmp_path / "a.pdf").exists()
    shared = str(store.attachment_id(store.old_shared))
    cli("attachments", "save", shared, "-o", str(tmp_path / "s.pdf"))
    assert (tmp_path / "s.pdf").read_bytes() == PDF_SHARED
    assert run_json(cli, "tickets", "show", "INQ-1")["subject"] == "old"
    assert cli("failed", "export", str(store.old_failed)).stdout_bytes.startswith(b"From:")


def test_purge_refuses_a_bad_duration(cli: Any) -> None:
    assert "--raw-older-than" in cli("purge", "--raw-older-than", "half a year", code=2).stderr


def test_rules_diff_leaves_purged_messages_out(cli: Any, store: Store) -> None:
    before = run_json(cli, "rules", "diff", str(ROOT / "rules.yaml"), "--since", "1000d")
    cli("purge", "--raw-older-than", "180d", "--yes")
    after = run_json(cli, "rules", "diff", str(ROOT / "rules.yaml"), "--since", "1000d")
    purged_routed = 2  # the old ticket and the old shared one (the duplicate is never replayed)
    assert after["replayed"] == before["replayed"] - purged_routed
