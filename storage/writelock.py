"""SQLite's one write lock, taken in turn: writers queue on a lock file instead of sleeping.

A SQLite database has one writer at a time. A connection that finds the write lock taken
sleeps in SQLite's busy handler (1, 2, 5, 10, 15, 20, 25, ... 100 ms) and looks again: with
the SMTP listener's ledger commits and the workers' processing transactions (a few ms each)
taking turns, a commit could sleep tens of ms while the lock was free most of the time, and
that sleep is what the sender waits for its `250`.

Here every connection of our engines takes an exclusive `flock` on `<database>-lock` before
its transaction's first INSERT, UPDATE, DELETE or REPLACE (the statements our code writes with;
migrations' DDL runs alone at start) and gives it up when the transaction ends (commit,
rollback, close): a writer waiting for it looks again every POLL_SECONDS (half a millisecond;
there is no queue), never 100 ms later. SQLite's own locking is unchanged and still decides;
the lock file only paces our writers. A writer that waits longer than the busy timeout gives up
on the file for the rest of its transaction and meets SQLite's busy handler as before (so the
longest wait is about twice the busy timeout); another program writing to the database, such as
the sqlite3 shell, does not take the file. The file gets the database file's mode and owner; if
it cannot be opened, writers go without it (logged once).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from typing import Any

log = logging.getLogger(__name__)

POLL_SECONDS = 0.0005
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def lock_path(database: str) -> str:
    """The lock file beside a database file."""
    return f"{os.path.abspath(database)}-lock"


def connection_factory(database: str, timeout_seconds: float) -> type[sqlite3.Connection]:
    """A `sqlite3.Connection` class (`sqlite3.connect(factory=...)`) whose connections take the
    lock file of `database` for each writing transaction."""

    class WriterLockedConnection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._lock = WriterLock(database, timeout_seconds)

        def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
            return super().cursor(factory or WriterLockedCursor)

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            return self.cursor().execute(sql, *args)

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self._lock.release()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self._lock.release()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._lock.close()

        def before_write(self, sql: str) -> None:
            if _writes(sql):
                self._lock.acquire()

    class WriterLockedCursor(sqlite3.Cursor):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            self.connection.before_write(sql)  # type: ignore[attr-defined]
            return super().execute(sql, *args)

        def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            self.connection.before_write(sql)  # type: ignore[attr-defined]
            return super().executemany(sql, *args)

    return WriterLockedConnection


def _writes(sql: str) -> bool:
    return sql.lstrip()[:7].upper().startswith(WRITES)


class WriterLock:
    """An exclusive `flock` on a database's lock file, held from a transaction's first write
    to its end."""

    unusable_logged = False  # a lock file that cannot be opened is said once per process

    def __init__(self, database: str, timeout_seconds: float) -> None:
        self.database = database
        self.timeout_seconds = timeout_seconds
        self._fd: int | None = None
        self.held = False
        self.gave_up = False  # waited the timeout in this transaction: SQLite decides

    def acquire(self) -> None:
        """Take the lock (a no-op if held); after the timeout, go on without it until the
        transaction ends."""
        if self.held or self.gave_up or not self._open():
            return
        assert self._fd is not None
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.gave_up = True  # SQLite's busy handler decides, as without the file
                    return
                time.sleep(POLL_SECONDS)
            else:
                self.held = True
                return

    def release(self) -> None:
        if self.held and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = self.gave_up = False

    def close(self) -> None:
        self.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        """Open the lock file once, made with the database file's mode and owner."""
        if self._fd is not None:
            return True
        path = lock_path(self.database)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, _mode_of(self.database))
            _same_owner(path, self.database)
        except OSError as exc:
            if not WriterLock.unusable_logged:
                WriterLock.unusable_logged = True
                log.warning("writing without the lock file %s: %s", path, exc)
            return False
        return True


def _mode_of(database: str) -> int:
    try:
        return os.stat(database).st_mode & 0o666
    except OSError:
        return 0o600


def _same_owner(path: str, database: str) -> None:
    """As SQLite does for its -wal and -shm files when it runs as root."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(database)
    except OSError:
        return
    os.chown(path, owner.st_uid, owner.st_gid)
