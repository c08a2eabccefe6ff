"""SQLite writers take turns on the lock file (storage/writelock.py): held from a transaction's
first write to its end, never by a transaction that only reads, and a writer that cannot get it
within the busy timeout is left to SQLite's own locking, as before."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.exc import OperationalError

from storage import db
from storage.models import InboundMessage
from storage.writelock import lock_path


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    path = tmp_path / "ledger.db"
    engine = db.make_engine(f"sqlite:///{path}", busy_timeout_ms=20_000)
    db.upgrade(engine)
    yield engine, path
    engine.dispose()


def lock_is_free(path: Path) -> bool:
    """Whether another process could take the lock file now."""
    fd = os.open(lock_path(str(path)), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def ledger_row(n: int) -> dict[str, object]:
    return {"source": "file", "size": 1, "sha256": f"{n:064x}", "dedupe_key": f"k{n}"}


def test_held_from_the_first_write_to_commit_and_rollback(database):
    engine, path = database
    for end in ("commit", "rollback"):
        with engine.connect() as conn:
            conn.execute(select(func.count()).select_from(InboundMessage))
            assert lock_is_free(path), "a read takes no lock"
            conn.execute(insert(InboundMessage), [ledger_row(1 if end == "commit" else 2)])
            assert not lock_is_free(path)
            getattr(conn, end)()
            assert lock_is_free(path), end
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(InboundMessage)) == 1


def test_past_the_busy_timeout_sqlite_decides_as_before(database):
    engine, path = database
    impatient = db.make_engine(f"sqlite:///{path}", busy_timeout_ms=50)
    with engine.connect() as holder:
        holder.execute(insert(InboundMessage), [ledger_row(1)])  # lock file and SQLite's lock
        refused = pytest.raises(OperationalError, match="database is locked")
        with refused, impatient.begin() as conn:
            conn.execute(insert(InboundMessage), [ledger_row(2)])
        holder.commit()
    with impatient.begin() as conn:  # and it works once the lock is free
        conn.execute(insert(InboundMessage), [ledger_row(3)])
    impatient.dispose()


def test_a_program_without_the_lock_file_still_meets_sqlites_lock(database):
    """The sqlite3 shell or another tool: SQLite's busy handler applies, as without the file."""
    _engine, path = database
    outsider = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    outsider.execute("BEGIN IMMEDIATE")
    impatient = db.make_engine(f"sqlite:///{path}", busy_timeout_ms=50)
    with pytest.raises(OperationalError, match="database is locked"), impatient.begin() as conn:
        conn.execute(text("UPDATE inbound_ledger SET attempts = attempts + 1"))
    assert lock_is_free(path), "a failed write gives the lock file back"
    outsider.execute("ROLLBACK")
    outsider.close()
    impatient.dispose()


def test_a_lock_file_held_past_the_timeout_leaves_it_to_sqlite(database):
    """Someone holds the file but not SQLite's lock: after the busy timeout the writer goes on
    without the file, for the rest of its transaction, and its writes commit."""
    _engine, path = database
    fd = os.open(lock_path(str(path)), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    impatient = db.make_engine(f"sqlite:///{path}", busy_timeout_ms=50)
    try:
        with impatient.begin() as conn:
            conn.execute(insert(InboundMessage), [ledger_row(1)])
            conn.execute(insert(InboundMessage), [ledger_row(2)])
        with impatient.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(InboundMessage)) == 2
    finally:
        os.close(fd)
        impatient.dispose()


def test_a_lock_file_that_cannot_be_opened_is_done_without(tmp_path):
    path = tmp_path / "ledger.db"
    Path(lock_path(str(path))).mkdir()  # a directory where the file should be
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(insert(InboundMessage), [ledger_row(1)])
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(InboundMessage)) == 1
    engine.dispose()


def test_the_lock_file_takes_the_database_files_mode(tmp_path):
    path = tmp_path / "ledger.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    Path(lock_path(str(path))).unlink()
    path.chmod(0o640)
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(insert(InboundMessage), [ledger_row(1)])
    assert Path(lock_path(str(path))).stat().st_mode & 0o777 == 0o640 & ~current_umask()
    engine.dispose()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
