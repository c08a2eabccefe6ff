"""The one backoff (IMAP reconnects, processing retries) and the processing retry schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import OperationalError

from config import RetrySettings
from pipeline.retry import backoff_delay, is_transient, retry_at
from sources.imap import RECONNECT_JITTER

FAILED_AT = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
DRAWS = 200


class DriverError(Exception):
    """What a DB-API driver raises, with the error code psycopg or sqlite3 would attach."""

    def __init__(self, sqlstate: str | None = None, sqlite_errorname: str | None = None):
        super().__init__(sqlstate or sqlite_errorname)
        self.sqlstate = sqlstate
        self.sqlite_errorname = sqlite_errorname


def database_error(**code: str) -> OperationalError:
    return OperationalError("UPDATE inbound_messages ...", {}, DriverError(**code))


def test_without_jitter_the_wait_doubles_up_to_the_maximum():
    delays = [backoff_delay(n, 60, 3600) for n in range(1, 9)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff_delay(10_000, 60, 3600) == 3600  # no overflow however long it fails


def test_with_jitter_the_wait_is_random_within_its_share_of_the_backoff():
    for attempt, ceiling in enumerate([1, 2, 4, 8, 8, 8], start=1):
        delays = [backoff_delay(attempt, 1, 8, jitter=0.5) for _ in range(DRAWS)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        # Spread over the whole window (each check fails by chance with p = 0.9**200).
        assert min(delays) < ceiling * 0.55 and max(delays) > ceiling * 0.95
    full = [backoff_delay(3, 1, 8, jitter=1) for _ in range(DRAWS)]
    assert all(0 <= delay <= 4 for delay in full) and min(full) < 0.4


def test_imap_reconnects_wait_between_half_and_all_of_the_backoff():
    assert RECONNECT_JITTER == 0.5
    delays = [backoff_delay(1, 0.05, 0.2, jitter=RECONNECT_JITTER) for _ in range(DRAWS)]
    assert all(0.025 <= delay <= 0.05 for delay in delays)


def test_attempts_count_from_one_and_jitter_is_a_share():
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(0, 1, 8)
    with pytest.raises(ValueError, match="from 0 to 1"):
        backoff_delay(1, 1, 8, jitter=1.5)


def test_transient_failures_are_retried_after_the_backoff_until_attempts_run_out():
    policy = RetrySettings(max_attempts=4, backoff_seconds=60, max_backoff_seconds=200)
    deadlock = database_error(sqlstate="40P01")
    schedule = [retry_at(policy, deadlock, attempts, FAILED_AT) for attempts in range(1, 6)]
    assert schedule == [
        FAILED_AT + timedelta(seconds=60),
        FAILED_AT + timedelta(seconds=120),
        FAILED_AT + timedelta(seconds=200),  # 240, capped
        None,  # max_attempts made: a human decides
        None,
    ]


def test_deterministic_failures_are_not_retried():
    policy = RetrySettings()
    assert retry_at(policy, RuntimeError("rule exploded"), 1, FAILED_AT) is None
    assert retry_at(policy, database_error(sqlstate="42P01"), 1, FAILED_AT) is None


def test_transient_means_a_lock_a_lost_connection_or_a_busy_database():
    assert is_transient(database_error(sqlstate="55P03"))  # lock_not_available
    assert is_transient(database_error(sqlstate="08006"))  # connection failure
    assert is_transient(database_error(sqlite_errorname="SQLITE_BUSY"))
    assert not is_transient(database_error(sqlite_errorname="SQLITE_ERROR"))
    assert not is_transient(database_error(sqlstate="23505"))  # unique violation
    assert is_transient(database_error())  # no code: the server was not reached
    try:
        try:
            raise database_error(sqlstate="40001")
        except OperationalError as exc:
            raise RuntimeError("routing failed") from exc
    except RuntimeError as wrapped:
        assert is_transient(wrapped)  # found through the cause
