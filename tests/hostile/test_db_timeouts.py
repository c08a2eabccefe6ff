"""A database that stops answering: `serve` answers DATA `451` instead of hanging, recovers when
the database does, and still shuts down (issue #12, item 6).

`mailintake serve` runs as a process. PostgreSQL is reached through `PgGate`, a TCP relay the
test can freeze: it keeps every connection open but passes nothing on (a stopped server, or a
network that swallows packets, while the kernel still acknowledges them). Locks are real ones,
taken by another connection: `LOCK TABLE` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite. Every
`451` asserted here comes from a database timeout unless the test says otherwise: the store
timeout, SMTP's own bound, is set far beyond the test's waits.
"""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from storage import db
from storage.models import InboundMessage
from storage.states import Fate
from tests.db_faults import PgGate, counts, ledger_locked, wait_for_tickets
from tests.mails import simple_mail
from tests.servers import serve_with

pytestmark = pytest.mark.slow

FAR = "600"  # seconds: a bound the test never reaches (the store timeout)


@pytest.fixture
def gate(pg_schema_url: str) -> Iterator[PgGate]:
    url = make_url(pg_schema_url)
    relay = PgGate((url.host or "127.0.0.1", url.port or 5432))
    yield relay
    relay.close()


def data_reply(port: int, message_id: str) -> int:
    """The reply code to DATA for one simple mail (`451` is a reply, not an exception)."""
    raw = simple_mail(message_id=message_id).replace(b"\n", b"\r\n")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo()
        client.mail("customer@example.com")
        client.rcpt("inquiry@wine-importer.example.jp")
        code, _ = client.data(raw)
    return code


@pytest.mark.postgres
def test_postgres_sessions_get_the_timeouts_and_keep_the_urls_own_options(pg_schema_url):
    engine = db.make_engine(pg_schema_url, statement_timeout_ms=4321, lock_timeout_ms=1234)
    try:
        with engine.connect() as conn:
            shown = [
                conn.scalar(text(f"SHOW {name}")) for name in ("statement_timeout", "lock_timeout")
            ]
            search_path = conn.scalar(text("SHOW search_path"))
    finally:
        engine.dispose()
    assert shown == ["4321ms", "1234ms"]
    assert search_path == make_url(pg_schema_url).query["options"].split("=", 1)[1]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_engines_are_made_without_a_pool_timeout(url):
    engine = db.make_engine(url, pool_timeout_seconds=5)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT 1")) == 1
    finally:
        engine.dispose()


def test_a_locked_ledger_is_answered_451_and_the_resend_becomes_one_ticket(
    tmp_path, serve_processes, db_url
):
    url = db_url
    child, port = serve_with(
        tmp_path,
        serve_processes,
        url,
        database__lock_timeout_ms="300",
        database__busy_timeout_ms="300",
        smtp__store_timeout_seconds=FAR,
    )
    with ledger_locked(url):
        refused = data_reply(port, "<locked@example.com>")
    accepted = data_reply(port, "<locked@example.com>")
    wait_for_tickets(url, 1)
    assert (refused, accepted) == (451, 250), child.output
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            fates = conn.scalars(select(InboundMessage.status)).all()
    finally:
        engine.dispose()
    assert fates == [Fate.TICKET]


@pytest.mark.postgres
def test_a_blackholed_database_is_answered_451_and_serve_recovers(
    tmp_path, serve_processes, gate, pg_schema_url
):
    url = gate.url(pg_schema_url)
    child, port = serve_with(
        tmp_path,
        serve_processes,
        url,
        database__connect_timeout_seconds="2",
        smtp__store_timeout_seconds=FAR,
    )
    before = counts(pg_schema_url)[1]
    assert data_reply(port, "<before@example.com>") == 250
    wait_for_tickets(pg_schema_url, before + 1)
    gate.freeze(cut=True)  # the open connections fail; new ones are never answered
    during = data_reply(port, "<blackholed@example.com>")
    gate.thaw()
    after = data_reply(port, "<blackholed@example.com>")
    wait_for_tickets(pg_schema_url, before + 2)
    assert (during, after) == (451, 250), child.output


@pytest.mark.postgres
def test_serve_stops_while_a_commit_waits_on_a_frozen_database(
    tmp_path, serve_processes, gate, pg_schema_url
):
    """The commit never returns (no client-side timeout can fire while the server's kernel
    acknowledges), so the store timeout answers 451; SIGTERM still ends serve, with exit 0."""
    child, port = serve_with(
        tmp_path,
        serve_processes,
        gate.url(pg_schema_url),
        smtp__store_timeout_seconds="1",
        smtp__shutdown_grace_seconds="1",
    )
    before = counts(pg_schema_url)[1]
    assert data_reply(port, "<warm@example.com>") == 250
    wait_for_tickets(pg_schema_url, before + 1)
    gate.freeze()
    assert data_reply(port, "<frozen@example.com>") == 451
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    assert "commit(s) still waiting for the database" in child.output
