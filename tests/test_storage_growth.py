"""The raw bytes apart from the ledger's status row (migration 0005): upgrade of a store with
data and back, the `inbound_messages` view that other tools read, and status updates that no
longer rewrite the message."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, MetaData, Table, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from storage import db, repo
from storage.models import Fate, InboundMessage, utcnow
from tests.conftest import PG_URL, pg_unavailable_reason
from tests.mails import simple_mail

FILE = Envelope(source="file")
ORIGINAL_MID = "<order-1@example.jp>"
# 8-bit Shift_JIS headers and CRLF: the bytes must come back exactly.
RAW_TICKET = (
    "From: 山田 <yamada@example.jp>\r\nSubject: 見積書の件\r\n"
    f"Message-ID: {ORIGINAL_MID}\r\n\r\n本文\r\n"
).encode("cp932")
RAW_COMMENT = (
    b"From: sato@example.jp\r\nSubject: Re: x\r\nMessage-ID: <re-1@example.jp>\r\n"
    b"In-Reply-To: <order-1@example.jp>\r\n\r\nthanks\r\n"
)
OLD_INDEXES = {
    "ix_inbound_messages_dedupe_key",
    "ix_inbound_messages_message_id",
    "ix_inbound_messages_received_at",
    "ix_inbound_messages_sha256",
    "ix_inbound_messages_status_id",
    "ix_inbound_messages_ticket_id",
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database (no migration run), on each backend."""
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'growth.db'}")
        yield engine
        engine.dispose()
        return
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    schema = f"mi_growth_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine = db.make_engine(
        f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    )
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def ledger_rows(engine: Engine) -> tuple[list[str], list[dict[str, Any]]]:
    """What a tool reading `inbound_messages` sees: the column names and every row."""
    with engine.connect() as conn:
        result = conn.execute(text("SELECT * FROM inbound_messages ORDER BY id"))
        columns = list(result.keys())
        return columns, [dict(zip(columns, row, strict=True)) for row in result]


def add_0004_store(engine: Engine) -> None:
    """A store as revision 0004 left it: a ticket with an attachment, a comment, a duplicate,
    a failure and an IMAP message never fetched (empty raw)."""
    now = datetime(2026, 12, 1, 10, tzinfo=UTC)
    with engine.begin() as conn:
        meta = MetaData()
        ledger = Table("inbound_messages", meta, autoload_with=conn)
        tables = {
            name: Table(name, meta, autoload_with=conn)
            for name in ("tickets", "ticket_comments", "attachment_blobs", "attachments")
        }
        common: dict[str, Any] = {
            "received_at": now,
            "source": "smtp",
            "rcpt_to": ["inquiry@wine-importer.example.jp"],
            "envelope": {"helo": "mx.example.jp"},
            "attempts": 1,
            "defects": [],
            "rule_hits": ["everyone-else"],
            "rule_misses": [],
        }
        rows = [
            (1, RAW_TICKET, ORIGINAL_MID, "mid:a", "ticket", None),
            (2, RAW_COMMENT, "<re-1@example.jp>", "mid:b", "comment", None),
            (3, RAW_TICKET, ORIGINAL_MID, "mid:a", "duplicate", None),
            (4, b"\r\n\r\n", None, "sha256:c", "failed", "parse"),
            (5, b"", "<huge@example.com>", "imap:inquiry:INBOX:1:7", "failed", "fetch"),
        ]
        for inbound_id, raw, mid, key, status, stage in rows:
            conn.execute(
                ledger.insert().values(
                    id=inbound_id,
                    raw=raw,
                    size=len(raw),
                    sha256=f"{inbound_id:064d}",
                    message_id=mid,
                    dedupe_key=key,
                    status=status,
                    fail_stage=stage,
                    error="Traceback ...\nValueError: x" if stage else None,
                    duplicate_of_id=1 if status == "duplicate" else None,
                    **common,
                )
            )
        conn.execute(
            tables["tickets"]
            .insert()
            .values(
                id=1,
                key="INQ-1",
                created_at=now,
                updated_at=now,
                source_kind="email",
                subject="見積書の件",
                body="本文",
                priority="normal",
                status="open",
                assignee="yamada",
                labels=[],
                fields={},
                rule_names=[],
                inbound_message_id=1,
                origin_key="mid:a",
            )
        )
        conn.execute(
            tables["ticket_comments"]
            .insert()
            .values(
                ticket_id=1,
                created_at=now,
                body="thanks",
                body_full="thanks",
                inbound_message_id=2,
                origin_key="mid:b",
            )
        )
        conn.execute(
            tables["attachment_blobs"].insert().values(sha256="f" * 64, size=4, content=b"%PDF")
        )
        conn.execute(
            tables["attachments"]
            .insert()
            .values(
                inbound_message_id=1,
                ticket_id=1,
                filename="見積書.pdf",
                content_type="application/pdf",
                inline=False,
                size=4,
                sha256="f" * 64,
            )
        )
        conn.execute(
            ledger.update().where(ledger.c.id.in_([1, 2, 3])).values(ticket_id=1),
        )
        if conn.dialect.name == "postgresql":  # explicit ids bypassed the sequences
            conn.execute(text("SELECT setval('inbound_messages_id_seq', 5)"))
            conn.execute(text("SELECT setval('tickets_id_seq', 1)"))


def foreign_key_targets(engine: Engine) -> set[str]:
    found = inspect(engine)
    return {
        key["referred_table"]
        for table in ("tickets", "ticket_comments", "attachments", "processing_attempts")
        for key in found.get_foreign_keys(table)
        if key["constrained_columns"] == ["inbound_message_id"]
    }


def test_upgrade_moves_the_raw_bytes_keeps_what_tools_read_and_downgrades(empty_engine):
    engine = empty_engine
    cfg = db.alembic_config(engine)
    command.upgrade(cfg, "0004")
    add_0004_store(engine)
    columns, before = ledger_rows(engine)

    command.upgrade(cfg, "head")
    # A tool reading inbound_messages sees the same columns, in the same order, and the same
    # values, raw bytes included.
    assert ledger_rows(engine) == (columns, before)
    found = inspect(engine)
    assert "inbound_messages" in found.get_view_names()
    assert "raw" not in {c["name"] for c in found.get_columns("inbound_ledger")}
    with engine.connect() as conn:
        moved = conn.execute(
            text("SELECT inbound_message_id, raw FROM inbound_raw ORDER BY inbound_message_id")
        ).all()
        assert [(i, bytes(raw)) for i, raw in moved] == [(r["id"], r["raw"]) for r in before]
        if conn.dialect.name == "sqlite":
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    assert foreign_key_targets(engine) == {"inbound_ledger"}
    assert "ix_inbound_ledger_message_id_status" in {
        i["name"] for i in found.get_indexes("inbound_ledger")
    }

    # The code works on the migrated rows: a reply to the migrated ticket becomes its comment.
    sessions = db.make_session_factory(engine)
    with sessions() as session:
        assert session.get_one(InboundMessage, 1).raw == RAW_TICKET
        assert session.get_one(InboundMessage, 5).raw == b""
    settings = Settings(database={"url": engine.url.render_as_string(hide_password=False)})
    reply = simple_mail(subject="Re: 見積書の件", headers={"In-Reply-To": ORIGINAL_MID})
    reply_id = receive(sessions, reply, FILE)
    assert process(PipelineContext(settings, sessions), reply_id) == Fate.COMMENT
    with sessions() as session:
        assert session.get_one(InboundMessage, reply_id).ticket_id == 1
    _columns, after = ledger_rows(engine)
    assert after[-1]["raw"] == reply

    command.downgrade(cfg, "0004")
    columns_down, down = ledger_rows(engine)
    if engine.dialect.name == "sqlite":  # PostgreSQL cannot put the column back in its place
        assert columns_down == columns
    assert down[: len(before)] == before
    assert down[-1]["raw"] == reply
    found = inspect(engine)
    assert not {"inbound_ledger", "inbound_raw"} & set(found.get_table_names())
    assert {i["name"] for i in found.get_indexes("inbound_messages")} == OLD_INDEXES
    assert "ix_tickets_assignee" in {i["name"] for i in found.get_indexes("tickets")}
    assert foreign_key_targets(engine) == {"inbound_messages"}
    raw_column = next(c for c in found.get_columns("inbound_messages") if c["name"] == "raw")
    assert raw_column["nullable"] is False

    command.upgrade(cfg, "head")
    assert ledger_rows(engine)[1][: len(before)] == before


def test_received_bytes_live_in_inbound_raw_and_listings_never_read_them(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    raw = simple_mail(attachments=[("a.pdf", "application/pdf", b"%PDF-1.4 " * 100)])
    inbound_id = receive(sessions, raw, FILE)
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT raw FROM inbound_raw WHERE inbound_message_id = :id"), {"id": inbound_id}
        ).scalar_one()
        assert bytes(stored) == raw
    assert "raw" not in InboundMessage.__table__.c

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with sessions() as session:
        assert [m.id for m in repo.list_messages(session)] == [inbound_id]
    assert statements and not any("inbound_raw" in sql for sql in statements)


def wal_bytes_written(
    engine: Engine, sessions: sessionmaker[Session], write: Any, inbound_id: int
) -> int:
    """How many bytes one committed write adds to SQLite's write-ahead log."""
    wal = Path(f"{engine.url.database}-wal")
    with engine.connect() as conn:
        busy, _frames, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    assert busy == 0 and wal.stat().st_size == 0
    with sessions.begin() as session:
        write(session, inbound_id)
    return wal.stat().st_size


def test_a_status_update_writes_the_small_row_not_the_message(tmp_path: Path) -> None:
    """SQLite rewrites a whole row when any column changes: with the bytes in the ledger row,
    the lease and the fate each wrote the message again (807 KB of log for 400 KB). Now each
    writes a few pages. (PostgreSQL keeps large values out of line, TOAST, and an update that
    leaves them alone does not copy them, so there is nothing to measure there.)"""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    raw = simple_mail(attachments=[("scan.tiff", "image/tiff", os.urandom(1_000_000))])
    inbound_id = receive(sessions, raw, FILE)

    def lease(session: Session, inbound_id: int) -> None:
        seen = repo.lease_of(session, inbound_id)
        assert seen is not None
        assert repo.take_lease(session, inbound_id, seen, "me", utcnow()) is not None

    def fate(session: Session, inbound_id: int) -> None:
        repo.set_fate(session, inbound_id, Fate.DROPPED, drop_reason="test")

    for write in (lease, fate):
        assert wal_bytes_written(engine, sessions, write, inbound_id) < 64 * 1024 < len(raw)
    engine.dispose()
