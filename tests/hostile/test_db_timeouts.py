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

import contextlib
import signal
import smtplib
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from storage import db
from storage.models import InboundMessage, Ticket
from storage.states import Fate
from tests.mails import simple_mail
from tests.servers import LISTENING, ServeProcess, wait_for

pytestmark = pytest.mark.slow

FAR = "600"  # seconds: a bound the test never reaches (the store timeout)


class PgGate:
    """A TCP relay to PostgreSQL. `freeze()` stops passing bytes on (connections stay open, new
    ones are accepted and never answered); `freeze(cut=True)` first closes the open ones, as a
    failover does; `thaw()` passes on again, including what was held back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """`url` (the real server's) redirected to the gate."""
        moved = make_url(url).set(host="127.0.0.1", port=self.port)
        return moved.render_as_string(hide_password=False)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def freeze(self, *, cut: bool = False) -> None:
        self.flowing.clear()
        if cut:
            self._close_all()

    def thaw(self) -> None:
        self.flowing.set()

    def _close_all(self) -> None:
        with self.lock:
            held, self.sockets = self.sockets, []
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()
        self.thaw()
        self._close_all()


@pytest.fixture
def gate(pg_schema_url: str) -> Iterator[PgGate]:
    url = make_url(pg_schema_url)
    relay = PgGate((url.host or "127.0.0.1", url.port or 5432))
    yield relay
    relay.close()


def start_serve(tmp_path: Path, serve_processes: list[ServeProcess], url: str, **env: str):
    child = ServeProcess(
        tmp_path,
        port=0,
        db_url=url,
        env={f"MAILINTAKE_{key.upper()}": value for key, value in env.items()},
    )
    serve_processes.append(child)
    return child, int(child.wait_for_line(LISTENING).group(1))


def data_reply(port: int, message_id: str) -> int:
    """The reply code to DATA for one simple mail (`451` is a reply, not an exception)."""
    raw = simple_mail(message_id=message_id).replace(b"\n", b"\r\n")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo()
        client.mail("customer@example.com")
        client.rcpt("inquiry@wine-importer.example.jp")
        code, _ = client.data(raw)
    return code


def counts(url: str) -> tuple[int, int]:
    """(ledger rows, tickets), read past the gate."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.scalar(select(func.count()).select_from(InboundMessage)) or 0
            tickets = conn.scalar(select(func.count()).select_from(Ticket)) or 0
    finally:
        engine.dispose()
    return rows, tickets


def wait_for_tickets(url: str, wanted: int) -> None:
    wait_for(lambda: counts(url)[1] == wanted, f"{wanted} ticket(s)")


@contextlib.contextmanager
def ledger_locked(url: str) -> Iterator[None]:
    """Another connection holds the lock every ledger insert needs, until the block ends."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(str(parsed.database), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the write lock: other writers wait, then are busy
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
        return
    engine = create_engine(url)
    try:
        with engine.begin() as locked:
            locked.execute(text("LOCK TABLE inbound_ledger IN EXCLUSIVE MODE"))
            yield  # reads go on; inserts wait for the lock, up to lock_timeout_ms
    finally:
        engine.dispose()


def test_a_locked_ledger_is_answered_451_and_the_resend_becomes_one_ticket(
    tmp_path, serve_processes, db_url
):
    url = db_url
    child, port = start_serve(
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
    child, port = start_serve(
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
    child, port = start_serve(
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
