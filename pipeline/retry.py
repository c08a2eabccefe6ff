"""Retrying by itself: which failures may go away, and how long to wait before trying again.

The one backoff of the service, used by both kinds of retry:

- an IMAP fetcher whose connection failed reconnects after `backoff_delay(n, ...)` seconds,
  n being its failures in a row (`imap.backoff_initial_seconds`, `imap.backoff_max_seconds`);
- a message whose processing failed transiently is retried at `retry_at(...)` (`retry:`).

Imports nothing from the pipeline or the sources, only the configuration.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

from config import RetrySettings

# PostgreSQL SQLSTATEs worth retrying: connection exceptions (08), transaction rollback
# (40: serialization failure, deadlock), insufficient resources (53), lock_not_available (55P03),
# operator intervention (57: statement timeout, admin shutdown).
TRANSIENT_SQLSTATES = ("08", "40", "53", "55P03", "57")
TRANSIENT_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED")


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: float = 0.0) -> float:
    """Seconds to wait after the `attempt`-th failure in a row (1 for the first).

    Exponential backoff: d = initial * 2**(attempt - 1), at most `maximum`. `jitter` (0 to 1) is
    the share of d left to chance: the wait is random in [d * (1 - jitter), d], so that clients
    that failed together do not all come back at the same moment. Without jitter it is d.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter is a share of the wait, from 0 to 1, got {jitter}")
    fixed = 1 - jitter
    wait: wait_base = wait_exponential(multiplier=initial * fixed, max=maximum * fixed)
    if jitter:
        # Full jitter over the rest: random in [0, jitter * d].
        wait += wait_random_exponential(multiplier=initial * jitter, max=maximum * jitter)
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return wait(state)


def retry_at(
    policy: RetrySettings, exc: BaseException, attempts: int, failed_at: datetime
) -> datetime | None:
    """When a message that failed with `exc` after `attempts` attempts is retried by itself;
    None if it waits for a human (deterministic failure, or attempts used up). The wait has no
    jitter: retry n comes `retry.backoff_seconds` * 2**(n - 1) after it failed, as configured."""
    if attempts >= policy.max_attempts or not is_transient(exc):
        return None
    delay = backoff_delay(attempts, policy.backoff_seconds, policy.max_backoff_seconds)
    return failed_at + timedelta(seconds=delay)


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
