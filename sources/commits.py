"""Ledger commits off the event loop, grouped: one commit for every message waiting.

Each SMTP/LMTP session's message waits here for a commit; one daemon thread takes all the
messages waiting (up to MAX_GROUP_MESSAGES and MAX_GROUP_BYTES) and commits them in one
transaction, then each waiting session answers `250`. Under load the sessions' rows share one
commit (one fsync) instead of queueing for a commit each (Postgres and MySQL call it group
commit); a lone message is committed at once, as before. Nothing is acknowledged before its
group's commit returned.

A group that fails for a reason that may lie in one of its messages (anything but a transient
database failure, `pipeline.retry.is_transient`) is committed again one message at a time, so a
message the database or our own code refuses costs its own sender a `451` and never its
neighbours'. A database that is down or busy fails the whole group once: every sender gets
`451` and retries.

A commit waiting on a frozen database (a stopped PostgreSQL, a blackholed network after the
connection was made) can wait longer than any client-side timeout: the server's kernel still
acknowledges every packet, so no libpq or TCP timeout fires. SMTP answers that client `451`
after `smtp.store_timeout_seconds`; the committing thread is a daemon, so it never keeps
`serve` from exiting: `drain(grace)` waits for the messages in hand up to the shutdown grace,
then `serve` exits without them. A commit that never finished was never acknowledged: its
sender retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeline.retry import is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_GROUP_MESSAGES = 64
MAX_GROUP_BYTES = 32 * 1024 * 1024  # a group also ends here (after its first message)
DRAIN_POLL_SECONDS = 0.05


@dataclass
class Waiting(Generic[T]):
    item: T
    size: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int]


class GroupCommitter(Generic[T]):
    """`commit(items) -> ids` run in one daemon thread over every item waiting at the time."""

    def __init__(
        self,
        commit: Callable[[Sequence[T]], list[int]],
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_commit(messages, seconds)` is told of each group committed (metrics; called in
        the committing thread)."""
        self._commit = commit
        self._on_commit = on_commit
        self._waiting: list[Waiting[T]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.in_hand = 0  # items handed in and not settled (read on the loop's thread)

    async def run(self, item: T, size: int) -> int:
        """Commit `item` (of `size` bytes) with whatever else is waiting; its row id."""
        loop = asyncio.get_running_loop()
        waiting = Waiting(item, size, loop, loop.create_future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the ledger committer is closed (serve is stopping)")
            self._start()
            self._waiting.append(waiting)
            self._wake.notify()
        self.in_hand += 1
        try:
            return await asyncio.shield(waiting.future)
        finally:
            self.in_hand -= 1

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds for the messages in hand; how many are still waiting."""
        deadline = time.monotonic() + grace
        while self.in_hand and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        return self.in_hand

    def close(self) -> None:
        """The thread ends once nothing waits (at shutdown, after `drain`)."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._thread_main, name="mailintake-commit", daemon=True
            )
            self._thread.start()

    def _thread_main(self) -> None:
        while group := self._take_group():
            try:
                outcomes = self._commit_group(group)
            except BaseException as exc:  # a bug of ours: no waiting session is left hanging
                log.exception("the ledger committer failed on a group of %d", len(group))
                outcomes = [exc] * len(group)
            for waiting, outcome in zip(group, outcomes, strict=True):
                _settle(waiting, outcome)

    def _take_group(self) -> list[Waiting[T]]:
        """The oldest waiting messages, up to the group's bounds; blocks until there is one
        (none: closed)."""
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            count, size = 0, 0
            for waiting in self._waiting:
                if count and (count >= MAX_GROUP_MESSAGES or size + waiting.size > MAX_GROUP_BYTES):
                    break
                count, size = count + 1, size + waiting.size
            group, self._waiting = self._waiting[:count], self._waiting[count:]
            return group

    def _commit_group(self, group: list[Waiting[T]]) -> list[int | BaseException]:
        started = time.monotonic()
        try:
            ids: list[int | BaseException] = [*self._commit([waiting.item for waiting in group])]
        except BaseException as exc:  # settles the waiting sessions: they answer 451
            if len(group) == 1 or is_transient(exc):
                return [exc] * len(group)
            log.warning(
                "a group of %d messages was refused (%s: %s); committing them one by one",
                len(group),
                type(exc).__name__,
                exc,
            )
            return [self._commit_one(waiting) for waiting in group]
        if len(ids) != len(group):
            raise RuntimeError(f"{len(ids)} row ids for a group of {len(group)}")
        if self._on_commit is not None:
            self._on_commit(len(group), time.monotonic() - started)
        return ids

    def _commit_one(self, waiting: Waiting[T]) -> int | BaseException:
        try:
            return self._commit([waiting.item])[0]
        except BaseException as exc:
            return exc


def _settle(waiting: Waiting[T], outcome: int | BaseException) -> None:
    def settle() -> None:
        if waiting.future.done():
            return
        if isinstance(outcome, BaseException):
            waiting.future.set_exception(outcome)
        else:
            waiting.future.set_result(outcome)

    # A closed loop: serve has exited without this commit.
    with contextlib.suppress(RuntimeError):
        waiting.loop.call_soon_threadsafe(settle)
