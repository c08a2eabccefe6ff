"""What a processing attempt records: who made it, and whether its failure retries by itself.

Used by the pipeline when it records an outcome, and by `pipeline.replay`.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from config import RetrySettings
from storage import repo

# PostgreSQL SQLSTATEs worth retrying: connection exceptions (08), transaction rollback
# (40: serialization failure, deadlock), insufficient resources (53), lock_not_available (55P03),
# operator intervention (57: statement timeout, admin shutdown).
TRANSIENT_SQLSTATES = ("08", "40", "53", "55P03", "57")
TRANSIENT_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED")


@dataclass(frozen=True)
class Actor:
    """Who made an attempt: host, process, login and command line."""

    host: str
    pid: int
    username: str | None
    command: str


def current_actor() -> Actor:
    """The running process, read at call time (a forked worker has its own pid)."""
    try:
        username: str | None = getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        username = None
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    return Actor(socket.gethostname(), os.getpid(), username, command)


def is_transient(exc: BaseException) -> bool:
    """A failure that may go away by itself: lost connection, lock timeout, deadlock, busy."""
    cause: BaseException | None = exc
    while cause is not None:
        if _transient_database_error(cause):
            return True
        cause = cause.__cause__
    return False


def _transient_database_error(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeoutError | DisconnectionError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(TRANSIENT_SQLSTATES)
    sqlite_error = getattr(exc.orig, "sqlite_errorname", None)
    if sqlite_error:
        return sqlite_error.startswith(TRANSIENT_SQLITE_ERRORS)
    # No error code from a server: the client could not reach it (refused, reset, timed out).
    return isinstance(exc, OperationalError)


def retry_at(
    policy: RetrySettings, exc: BaseException, attempts: int, failed_at: datetime
) -> datetime | None:
    """When a message that failed with `exc` after `attempts` attempts is retried by itself;
    None if it waits for a human (deterministic failure, or attempts used up)."""
    if attempts >= policy.max_attempts or not is_transient(exc):
        return None
    delay = min(policy.backoff_seconds * 2 ** (attempts - 1), policy.max_backoff_seconds)
    return failed_at + timedelta(seconds=delay)


def record_attempt(
    session: Session,
    inbound_id: int,
    outcome: str,
    stage: str | None = None,
    error: str | None = None,
) -> None:
    """Add to the message's history, as made by this process, in the caller's transaction."""
    repo.add_attempt(
        session, inbound_id, outcome, stage=stage, error=error, **asdict(current_actor())
    )
