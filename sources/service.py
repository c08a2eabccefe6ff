"""`mailintake serve`: the listeners, background tasks and the processing workers.

The event loop only talks SMTP/LMTP. Committing a message (`intake.receive_batch`) runs in a
thread, together with the other sessions' messages waiting at the time (group commit,
sources/commits.py), so a slow commit never blocks the loop; processing (parse, rules,
ticket) runs in worker processes (`WorkerPool`, `processing.mode: process`) or in a
`ProcessingWorker` thread (`processing.mode: thread`, and tests that bring their own pipeline),
woken after every commit, so no sender waits for it (sources/workers.py).

Other sources plug in as background tasks: `Service.add_task(name, task)` where `task(stop)` is
a coroutine function that runs until the `stop` event is set. A task that stores a message
calls `await service.store(raw, envelope)`, which commits and wakes the worker.

The admin HTTP listener (`http.enabled`, sources/http.py) runs in the same loop: /metrics,
/healthz, /readyz. The service keeps what they look at in `parts` (the SMTP handler and door,
the IMAP fetchers, the rules holder the command line gives it).

Shutdown (SIGTERM/SIGINT): stop accepting, say goodbye (421) to idle clients, let clients in
the middle of a transaction finish within `smtp.shutdown_grace_seconds`, then close the rest
(their unacknowledged message stays theirs to retry), stop the tasks, let the in-flight commits
(up to the grace period: one stuck on a frozen database is left behind) and the message being
processed finish (workers still busy after the grace period are
killed; their message stays `received` for the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from starlette.routing import BaseRoute

from config import ListenerSettings, Settings
from ingest.intake import receive_batch
from ingest.mail import Envelope
from pipeline.process import PipelineContext
from sources.commits import GroupCommitter
from sources.http import HttpListener, Readiness, create_app
from sources.imap import FolderFetcher, Hooks, fetch_until_stopped, folder_fetchers
from sources.metrics import Metrics, Parts
from sources.smtp import (
    Door,
    IntakeHandler,
    IntakeLMTP,
    IntakeSMTP,
    protocol_factory,
    tls_context,
)
from sources.systemd import notify
from sources.workers import ProcessingWorker, WorkerPool

log = logging.getLogger(__name__)

BackgroundTask = Callable[[asyncio.Event], Awaitable[None]]

DRAIN_POLL_SECONDS = 0.05
SUPERVISE_SECONDS = 0.2  # how often dead worker processes are looked for


class ListenerError(RuntimeError):
    """A listener could not start (port taken, certificate unreadable); says which and why."""


@dataclass
class Listener:
    name: str
    server: asyncio.Server

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port


class Service:
    """Everything `mailintake serve` runs; tests run it in a thread with their own settings."""

    def __init__(
        self,
        settings: Settings,
        pipeline: PipelineContext,
        workers: WorkerPool | None = None,
    ) -> None:
        """`pipeline` gives the sessions the ledger is written with; processing runs in
        `workers` (processes that build their own pipeline) or, without them, in a thread with
        `pipeline` (its router and templates)."""
        self.settings = settings
        self.pipeline = pipeline
        self.worker: ProcessingWorker | WorkerPool = workers or ProcessingWorker(
            pipeline, settings.processing.rescan_seconds
        )
        self.door = Door(settings.smtp)
        self.handler: IntakeHandler | None = None  # made when the listeners start
        self.listeners: list[Listener] = []
        self.tasks: list[tuple[str, BackgroundTask]] = []
        # Fetchers commit each message, then wake the worker.
        self.fetchers: list[FolderFetcher] = folder_fetchers(
            settings, pipeline.sessions, Hooks(self._fetched)
        )
        if self.fetchers:
            self.add_task(
                "imap",
                partial(
                    fetch_until_stopped,
                    settings,
                    pipeline.sessions,
                    self._fetched,
                    fetchers=self.fetchers,
                ),
            )
        self.parts = Parts(door=self.door, fetchers=self.fetchers)
        multiprocess_dir = workers.metrics_dir if workers is not None else None
        self.metrics = Metrics(pipeline.sessions, self.parts, multiprocess_dir)
        self.http: HttpListener | None = None
        self.http_routes: list[BaseRoute] = []  # more for the HTTP listener (the web pages)
        self._commits: GroupCommitter[tuple[bytes, Envelope]] | None = None

    def _fetched(self, _inbound_id: int) -> None:
        self.metrics.received.labels("imap").inc()
        self.worker.wake()

    def add_task(self, name: str, task: BackgroundTask) -> None:
        """Run `task(stop)` beside the listeners (e.g. an IMAP fetcher, a rules reloader)."""
        self.tasks.append((name, task))

    def address(self, name: str) -> tuple[str, int]:
        """Where listener `name` ("smtp", "lmtp" or "http") listens (the real port when 0 was
        asked)."""
        if name == "http":
            assert self.http is not None, "the HTTP listener is not running"
            return self.http.address
        return next(listener.address for listener in self.listeners if listener.name == name)

    async def store(self, raw: bytes, envelope: Envelope) -> int:
        """Commit a message to the ledger (in a thread, with the other sessions' messages
        waiting at the time: sources/commits.py) and wake the worker; raises on failure."""
        assert self._commits is not None, "store() is only available while the service runs"
        inbound_id = await self._commits.run((raw, envelope), len(raw))
        self.metrics.received.labels(envelope.source).inc()
        self.worker.wake()
        return inbound_id

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until `stop` is set, then shut down gracefully. Raises ListenerError."""
        self._commits = GroupCommitter(
            partial(receive_batch, self.pipeline.sessions), self.metrics.ledger_committed
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._listen()
            self.worker.start()
            tasks = [asyncio.create_task(self._guard(n, t, stop), name=n) for n, t in self.tasks]
            tasks.append(asyncio.create_task(self._supervise(stop), name="supervise"))
            if on_ready is not None:
                on_ready()
            await stop.wait()
        finally:
            stop.set()  # tells the background tasks, also when starting failed
            await self._shutdown(tasks)

    async def _listen(self) -> None:
        smtp = self.settings.smtp
        try:
            context = tls_context(smtp)
        except (OSError, ValueError) as exc:
            raise ListenerError(
                f"cannot load smtp.tls_cert {smtp.tls_cert} / smtp.tls_key {smtp.tls_key}: {exc}"
            ) from exc
        hostname = smtp.hostname or socket.getfqdn()
        handler = IntakeHandler(
            smtp, self.store, max_bytes=self.settings.intake.max_message_bytes, hostname=hostname
        )
        handler.on_data_reply = self.metrics.smtp_replied
        self.handler = self.parts.handler = handler
        wanted = [("smtp", IntakeSMTP, smtp), ("lmtp", IntakeLMTP, self.settings.lmtp)]
        for name, protocol, where in wanted:
            if not where.enabled:
                continue
            factory = protocol_factory(protocol, handler, self.door, smtp, context)
            self.listeners.append(Listener(name, await self._bind(name, factory, where)))
            host, port = self.address(name)
            log.info("listening for %s on %s:%d", name.upper(), host, port)
        if self.settings.http.enabled:
            await self._listen_http()

    async def _listen_http(self) -> None:
        where = self.settings.http
        readiness = Readiness(self.settings, self.pipeline.sessions, self.parts)
        http = HttpListener(
            create_app(self.metrics, readiness, self.http_routes), where.host, where.port
        )
        try:
            await http.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenerError(
                f"cannot listen for HTTP on {where.host}:{where.port}: {reason} (the address is "
                "http.host/http.port in the config, or MAILINTAKE_HTTP__PORT; http.enabled: "
                "false turns it off)"
            ) from exc
        self.http = http
        host, port = http.address
        log.info("listening for HTTP on %s:%d", host, port)

    async def _bind(
        self, name: str, factory: Callable[[], IntakeSMTP], where: ListenerSettings
    ) -> asyncio.Server:
        host, port = where.host, where.port
        try:
            return await asyncio.get_running_loop().create_server(factory, host, port)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenerError(
                f"cannot listen for {name.upper()} on {host}:{port}: {reason} "
                f"(is another `mailintake serve` running? the address is {name}.host/{name}.port "
                f"in the config, or MAILINTAKE_{name.upper()}__PORT)"
            ) from exc

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Restart worker processes that died, until `stop`."""
        while not stop.is_set():
            self.worker.supervise()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SUPERVISE_SECONDS)

    async def _guard(self, name: str, task: BackgroundTask, stop: asyncio.Event) -> None:
        """A background task that crashes is logged; it does not take the listeners down."""
        try:
            await task(stop)
        except Exception:
            log.exception("background task %s stopped with an error", name)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        grace = self.settings.smtp.shutdown_grace_seconds
        for listener in self.listeners:
            listener.server.close()  # stop accepting
        await self._drain_sessions(grace)
        await self._stop_tasks(tasks, grace)
        if self._commits is not None:
            # In-flight commits finish; their clients either got their 250 or will retry. One
            # waiting on a frozen database is left behind (sources/commits.py).
            left = await self._commits.drain(grace)
            if left:
                log.warning("%d commit(s) still waiting for the database after %.0f s", left, grace)
            self._commits.close()
        stopped = await asyncio.get_running_loop().run_in_executor(None, self.worker.stop, grace)
        if not stopped:
            log.warning("processing did not finish within %.0f s; it resumes on next start", grace)
        for listener in self.listeners:
            await listener.server.wait_closed()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped")

    async def _drain_sessions(self, grace: float) -> None:
        """Let clients finish the transaction they are in, up to `grace` seconds."""
        self.door.closing = True
        deadline = time.monotonic() + grace
        while self.door.inside and time.monotonic() < deadline:
            self.door.send_idle_away()
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if self.door.inside:
            log.warning(
                "closing %d session(s) still sending after %.0f s", len(self.door.inside), grace
            )
            self.door.send_all_away()
        await asyncio.sleep(0)  # let the transports run their connection_lost

    async def _stop_tasks(self, tasks: list[asyncio.Task[None]], grace: float) -> None:
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            log.warning("background task %s did not stop within %.0f s", task.get_name(), grace)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def serve_until_signalled(service: Service) -> None:
    """Run `service` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        log.info("%s received: shutting down", signum.name)
        notify("STOPPING=1")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # Type=notify: systemd counts the service started once every listener is bound.
    await service.run(stop, on_ready=partial(notify, "READY=1"))
