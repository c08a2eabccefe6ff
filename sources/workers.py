"""Processing (parse, rules, ticket) away from the SMTP event loop: the loop that turns ledger
rows into tickets, run in a thread (`processing.mode: thread`, tests) or in worker processes
(`processing.mode: process`, the default of `mailintake serve`).

In process mode the listener process only receives, commits the raw bytes and answers; no
message, however costly or hostile, holds the listener's GIL, and every core works.

- **Started** with the multiprocessing "spawn" context: each worker builds its own engine,
  session factory, rules holder and templates from the settings it is given. Nothing connects
  or reads configuration at import time.
- **Woken** through a pipe from the parent: one byte after each commit (`wake()`); workers also
  rescan every `processing.rescan_seconds`, which picks up due retries and rows other
  processes (or other nodes) left.
- **Reloaded** the same way: the parent watches the rules and templates files (and takes
  SIGHUP), validates the new version itself and, if it loads, tells every worker to reload. A
  worker whose reload is refused keeps its last good version; a worker (re)started while a file
  is broken starts with the parent's last good copy.
- **Stopped** by closing the pipe: the worker finishes the message in hand and exits. SIGTERM
  does the same (systemd signals the whole group); SIGINT and SIGHUP are the parent's. A worker
  still busy when the grace period ends is killed: its transaction rolls back, the row stays
  `received` and the next start takes over its lease (pipeline/leases.py). A parent that dies
  closes the pipe too, so workers never outlive it by more than a message.
- **Restarted** by the parent when one dies (a line names it), unless the service is stopping.
- **Claiming.** A worker takes the oldest waiting row that no living process holds
  (`process_waiting`, pipeline/leases.py `claim_next`): any worker's, any node's. On PostgreSQL
  the candidates are read `FOR UPDATE SKIP LOCKED`, so workers and nodes on one store never
  pick the same row; a node that died leaves rows that the others take at their next pass
  (this host: at once; another host: when the lease runs out). Each next claim is committed
  with the previous message's outcome (one commit per message); a stop asked for after that
  commit still lets the worker finish the message it claimed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from config import ConfigError, Settings
from pipeline.context import PipelineContext
from pipeline.process import process_waiting
from pipeline.replay import retry_due
from rules.engine import RulesRouter
from rules.load import RulesError, load_rules
from rules.reload import RulesHolder, TemplatesHolder
from sources import logs
from sources.metrics import observe_processing, processing_histogram, write_to_directory
from storage import db

log = logging.getLogger(__name__)

RETRY_BATCH = 10  # automatic retries per pass, between which a stop request is honoured
WAKE = b"w"
RELOAD = b"r"
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
RESTART_BACKOFF_MAX = 30.0  # a worker that keeps dying at start is restarted at most this often
QUICK_DEATH_SECONDS = 5.0


def drain(pipeline: PipelineContext, stop: threading.Event) -> None:
    """Process waiting messages until none is left that no living process holds, then due
    retries. Each is claimed first (`process_waiting`): any node's row, one process at a time,
    the next claim taken in the transaction that stores the previous outcome."""
    started = time.monotonic()
    for _inbound_id, fate in process_waiting(pipeline, lambda: not stop.is_set()):
        if fate is not None:
            observe_processing(time.monotonic() - started)
        started = time.monotonic()
    while not stop.is_set() and retry_due(pipeline, limit=RETRY_BATCH).outcomes:
        pass


def run_loop(
    pipeline: PipelineContext,
    wake: threading.Event,
    stop: threading.Event,
    rescan_seconds: float,
) -> None:
    """The processing loop, in a thread or a worker process: wait for a wake (or the rescan
    time), drain, repeat until `stop`; an error pauses processing until the next pass."""
    while not stop.is_set():
        wake.wait(rescan_seconds)
        wake.clear()
        try:
            drain(pipeline, stop)
        except Exception:
            log.exception("processing paused, retrying in %.0f s", rescan_seconds)


class ProcessingWorker:
    """Turns ledger rows into tickets in a thread of this process; `wake()` after each commit.

    Used with `processing.mode: thread`, and by tests that bring their own PipelineContext."""

    def __init__(self, pipeline: PipelineContext, rescan_seconds: float = 30.0):
        self.pipeline = pipeline
        self.rescan_seconds = rescan_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._wake.set()  # first pass: rows left over from an earlier run
        self._thread = threading.Thread(
            target=run_loop,
            args=(self.pipeline, self._wake, self._stop, self.rescan_seconds),
            name="mailintake-worker",
            daemon=True,
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def reload(self) -> None:
        """Nothing to do: the thread routes with the holder the caller reloads."""

    def supervise(self) -> None:
        """Nothing to do: a thread that stopped has logged why."""

    def stop(self, timeout: float) -> bool:
        """Finish the message in hand, then stop; False if it did not finish within `timeout`.

        A message cut off is rolled back and stays `received`, processed on the next start.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


# --- worker processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is given (pickled by spawn): its name and settings."""

    name: str
    settings: Settings
    rescan_seconds: float
    log_level: int
    rules_fallback: Path | None  # the parent's last good copy of the rules file
    metrics_dir: Path | None = None  # where its metrics go for the parent's /metrics
    log_format: str = "human"
    templates_fallback: Path | None = None  # and of the templates file


def worker_main(spec: WorkerSpec, control: Connection) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter)."""
    _setup_logging(spec)
    if spec.metrics_dir is not None:
        write_to_directory(spec.metrics_dir)
        processing_histogram()  # the parent shows it from the start, at 0
    stop, wake = threading.Event(), threading.Event()

    def on_term(_signum: int, _frame: object) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent validates and tells us to reload
    settings = spec.settings
    engine = db.make_engine(settings.database.url, **settings.database.engine_options())
    try:
        sessions = db.make_session_factory(engine)
        holder = _rules_holder(spec)
        try:
            templates = _templates_holder(spec)
        except ConfigError as exc:
            log.error("templates file refused, %s exits:\n%s", spec.name, exc)
            raise SystemExit(2) from exc
        if holder is None:
            pipeline = PipelineContext(settings, sessions)
        else:
            pipeline = PipelineContext(settings, sessions, RulesRouter(holder.current))
        pipeline.template_source = templates.current
        listener = threading.Thread(
            target=_listen,
            args=(control, [h for h in (holder, templates) if h is not None], wake, stop),
            name="control",
            daemon=True,
        )
        listener.start()
        running = ", ".join(h.describe() for h in (holder, templates) if h is not None)
        log.info("%s started (pid %d)", spec.name, os.getpid())
        log.info("%s: %s in force", spec.name, running)
        wake.set()  # first pass: rows left over from an earlier run
        run_loop(pipeline, wake, stop, spec.rescan_seconds)
        log.info("%s stopped", spec.name)
    finally:
        engine.dispose()


def _setup_logging(spec: WorkerSpec) -> None:
    multiprocessing.current_process().name = spec.name
    logs.setup(spec.log_format, spec.log_level, LOG_FORMAT)
    logging.getLogger("mailparser").setLevel(logging.ERROR)


def _rules_holder(spec: WorkerSpec) -> RulesHolder | None:
    path = spec.settings.rules.path
    if path is None:
        return None
    try:
        return RulesHolder.load(path, spec.settings.zone, spec.settings.authserv_id)
    except RulesError as exc:
        if spec.rules_fallback is None:
            raise
        log.error("rules file refused, %s starts with the last good rules:\n%s", spec.name, exc)
        zone = spec.settings.zone
        fallback = load_rules(spec.rules_fallback, zone, spec.settings.authserv_id)
        return RulesHolder(path, fallback, zone)


def _templates_holder(spec: WorkerSpec) -> TemplatesHolder:
    chosen = spec.settings.templates
    required = chosen.required
    try:
        return TemplatesHolder.load(chosen.path, required=required)
    except ConfigError as exc:
        if spec.templates_fallback is None:
            raise
        log.error("templates file refused, %s starts with the last good ones:\n%s", spec.name, exc)
        last_good = TemplatesHolder.load(spec.templates_fallback)
        return TemplatesHolder(chosen.path, last_good.current(), last_good.version, required)


def _listen(
    control: Connection,
    holders: list[RulesHolder | TemplatesHolder],
    wake: threading.Event,
    stop: threading.Event,
) -> None:
    """Read the parent's pipe: wake, reload; end of file (closed or parent gone) means stop."""
    fd = control.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            stop.set()
            wake.set()
            return
        if RELOAD in data:
            for holder in holders:
                holder.reload()
        if WAKE in data:
            wake.set()


@dataclass
class Slot:
    """One worker process as the parent sees it."""

    spec: WorkerSpec
    process: BaseProcess | None = None
    control: Connection | None = None  # our (write) end of its pipe
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_after: float = 0.0


class WorkerPool:
    """The parent's side of `processing.workers` worker processes."""

    def __init__(
        self,
        settings: Settings,
        rules: RulesHolder | None = None,
        templates: TemplatesHolder | None = None,
    ) -> None:
        self.settings = settings
        self._mp = multiprocessing.get_context("spawn")
        self._stopping = False
        self._lock = threading.Lock()  # wake() may come from IMAP fetcher threads
        self._snapshot_dir: Path | None = None
        self._fallback: Path | None = None
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="mailintake-metrics-"))
        self._templates_fallback: Path | None = None
        if rules is not None or templates is not None:
            self._snapshot_dir = Path(tempfile.mkdtemp(prefix="mailintake-rules-"))
        if rules is not None and self._snapshot_dir is not None:
            self._fallback = self._snapshot_dir / rules.path.name
            self.rules_changed(rules)
        if templates is not None and self._snapshot_dir is not None:
            self._templates_fallback = self._snapshot_dir / f"templates-{templates.path.name}"
            self.templates_changed(templates)
        count = settings.processing.workers
        self.slots = [
            Slot(
                WorkerSpec(
                    name=f"worker-{i + 1}",
                    settings=settings,
                    rescan_seconds=settings.processing.rescan_seconds,
                    log_level=logging.getLogger().getEffectiveLevel(),
                    rules_fallback=self._fallback,
                    metrics_dir=self.metrics_dir,
                    log_format=logs.current_format(),
                    templates_fallback=self._templates_fallback,
                )
            )
            for i in range(count)
        ]

    def rules_changed(self, holder: RulesHolder) -> None:
        """Keep a copy of the rules in force for workers started while the file is broken."""
        if self._fallback is None or holder.last_error is not None:
            return
        with contextlib.suppress(OSError):
            raw = holder.path.read_bytes()
            if hashlib.sha256(raw).hexdigest() == holder.current().version:  # not edited since
                self._fallback.write_bytes(raw)

    def templates_changed(self, holder: TemplatesHolder) -> None:
        """Keep a copy of the templates in force, as `rules_changed` does for the rules."""
        if self._templates_fallback is None or holder.last_error is not None:
            return
        with contextlib.suppress(OSError):
            raw = holder.path.read_bytes()
            if hashlib.sha256(raw).hexdigest() == holder.version:
                self._templates_fallback.write_bytes(raw)

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        theirs, ours = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(
            target=worker_main, args=(slot.spec, theirs), name=slot.spec.name, daemon=False
        )
        proc.start()
        theirs.close()
        os.set_blocking(ours.fileno(), False)
        slot.process, slot.control, slot.started_at = proc, ours, time.monotonic()

    def wake(self) -> None:
        self._send(WAKE)

    def reload(self) -> None:
        self._send(RELOAD)

    def _send(self, byte: bytes) -> None:
        with self._lock:
            for slot in self.slots:
                if slot.control is None:
                    continue
                # A full pipe already holds a wake; a dead worker is restarted and rescans.
                with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
                    os.write(slot.control.fileno(), byte)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None and s.process.pid]

    def supervise(self) -> None:
        """Restart workers that died (called periodically by the service), unless stopping."""
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.process
            if self._stopping or proc is None:
                continue
            if proc.is_alive():
                continue
            if slot.control is not None:  # first time we see it dead
                proc.join(0)
                with self._lock:
                    slot.control.close()
                    slot.control = None
                quick = now - slot.started_at < QUICK_DEATH_SECONDS
                slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
                delay = min(2.0 ** (slot.quick_deaths - 1), RESTART_BACKOFF_MAX) if quick else 0.0
                slot.restart_after = now + delay
                log.error(
                    "%s (pid %s) died with %s; restarting it%s",
                    slot.spec.name,
                    proc.pid,
                    _exit_reason(proc.exitcode),
                    f" in {delay:.0f} s" if delay else "",
                )
            if now >= slot.restart_after:
                self._spawn(slot)

    def stop(self, timeout: float) -> bool:
        """Tell workers to stop after the message in hand; kill those still busy after
        `timeout` seconds. True if all stopped by themselves."""
        self._stopping = True
        with self._lock:
            for slot in self.slots:
                if slot.control is not None:
                    slot.control.close()  # end of file: stop
                    slot.control = None
        deadline = time.monotonic() + timeout
        clean = True
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                clean = False
                log.warning("%s did not stop within %.0f s: killed", slot.spec.name, timeout)
                slot.process.kill()
                slot.process.join()
        if self._snapshot_dir is not None:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return clean


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class WorkerRules(RulesHolder):
    """The parent's copy of the rules in process mode: it validates each change (and logs a
    refused one once), then tells the workers to reload theirs."""

    def __init__(self, holder: RulesHolder, workers: WorkerPool) -> None:
        super().__init__(holder.path, holder.current(), holder.zone)
        self.workers = workers
        self.reload_errors = 0  # refused edits, for metrics

    def reload(self) -> bool:
        changed = super().reload()
        if self.last_error is not None:
            self.reload_errors += 1
        else:
            self.workers.rules_changed(self)
            self.workers.reload()
        return changed


class WorkerTemplates(TemplatesHolder):
    """The parent's copy of the templates in process mode, like `WorkerRules`."""

    def __init__(self, holder: TemplatesHolder, workers: WorkerPool) -> None:
        super().__init__(holder.path, holder.current(), holder.version, holder.required)
        self.workers = workers

    def reload(self) -> bool:
        changed = super().reload()
        if self.last_error is None:
            self.workers.templates_changed(self)
            self.workers.reload()
        return changed
