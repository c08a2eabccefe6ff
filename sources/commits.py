"""Ledger commits off the event loop, in daemon threads that never hold up the process's exit.

A commit waiting on a frozen database (a stopped PostgreSQL, a blackholed network after the
connection was made) can wait longer than any client-side timeout: the server's kernel still
acknowledges every packet, so no libpq or TCP timeout fires. SMTP has long answered that client
`451` (`smtp.store_timeout_seconds`); a `ThreadPoolExecutor` thread would still have kept
`serve` from exiting, since the interpreter joins those threads at exit. These threads are
daemons: `drain(grace)` waits for the commits in flight up to the shutdown grace, then `serve`
exits without them. A commit that never finished was never acknowledged: its sender retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# As many commits at once as the receive pool used to run (ThreadPoolExecutor's default on a
# small machine); the others wait their turn, under the same store timeout.
DEFAULT_CONCURRENCY = 8
DRAIN_POLL_SECONDS = 0.05


class CommitThreads:
    """Runs blocking calls in daemon threads, at most `concurrency` at once."""

    def __init__(self, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self.running = 0  # threads started and not finished (changed on the loop's thread only)

    async def run(self, call: Callable[..., T], *args: object) -> T:
        """`call(*args)` in a thread of its own; its result or its exception."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            self.running += 1
            thread = threading.Thread(
                target=self._thread_main,
                args=(loop, future, call, args),
                name="mailintake-receive",
                daemon=True,
            )
            thread.start()
            return await asyncio.shield(future)

    def _thread_main(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[T],
        call: Callable[..., T],
        args: tuple[object, ...],
    ) -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = call(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        self._settle(loop, future, result, error)

    def _settle(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[T],
        result: T | None,
        error: BaseException | None,
    ) -> None:
        def settle() -> None:
            self.running -= 1
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        # A closed loop: serve has exited without this commit.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds for the commits in flight; how many are still waiting."""
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        return self.running
