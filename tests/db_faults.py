"""Ways to make the database unavailable to a running `serve`, for tests: a relay to PostgreSQL
that can be frozen (`PgGate`) and a real lock on the ledger held by another connection
(`ledger_locked`); and what became of the mail meanwhile (`counts`)."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from collections.abc import Iterator

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from storage import db
from storage.models import InboundMessage, Ticket
from tests.waiting import wait_for


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


def counts(url: str) -> tuple[int, int]:
    """(ledger rows, tickets) in the database at `url`."""
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
