"""The one place where tests wait: `wait_for(condition, what)` polls until `condition()` holds.

It checks often (every few milliseconds, backing off to 50 ms), so a test goes on as soon as
what it waits for has happened. Its bound is not a speed requirement: it only turns a hang into
a failure that names what never happened, long before pytest-timeout would end the test.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Generous on purpose: a loaded 2-core CI machine running two xdist workers must never hit it
# while the code under test works; it stays below the per-test pytest-timeout (pyproject.toml).
WAIT_SECONDS = 180.0
_FIRST_POLL = 0.005
_MAX_POLL = 0.05


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Return once `condition()` is true; fail naming `what` if it never becomes true."""
    deadline = time.monotonic() + timeout
    poll = _FIRST_POLL
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up waiting for {what} (never happened in {timeout:.0f} s)")
        time.sleep(poll)
        poll = min(poll * 2, _MAX_POLL)


class LogCounter(logging.Handler):
    """Counts log records that `matches` accepts, from any logger and thread; `reached` is set
    once there are `wanted` of them. Attach it with `with counter.attached(): ...`."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool], wanted: int = 1) -> None:
        super().__init__(logging.DEBUG)
        self.matches = matches
        self.wanted = wanted
        self.records: list[logging.LogRecord] = []
        self.reached = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.matches(record):
            self.records.append(record)
            if len(self.records) >= self.wanted:
                self.reached.set()

    @contextmanager
    def attached(self, logger: logging.Logger | None = None) -> Iterator[LogCounter]:
        target = logger or logging.getLogger()
        target.addHandler(self)
        try:
            yield self
        finally:
            target.removeHandler(self)
