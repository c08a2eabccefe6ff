"""What `mailintake serve` exposes at /metrics (Prometheus), and the readiness checks of /readyz.

Where each number comes from, since processing runs in worker processes of their own:

- **Counted in the listener process** (the process that answers /metrics): messages received by
  source (after the ledger commit), SMTP replies by code, the time a client waited for its DATA
  reply. Connections the door refused count as replies too (they get one line and are closed).
- **Read from the database at scrape time** (`LedgerCollector`, a few indexed aggregate
  queries): messages by status (their fate), the backlog (rows still `received`) and the age of
  its oldest row, failed rows, and failed rows with a retry scheduled. They are right whichever
  process did the work and survive restarts.
- **Processing time** is measured around each `process()` call by whatever runs it: a thread of
  the listener process (`processing.mode: thread`), or the worker processes, which write it to
  prometheus-client's multiprocess files in a directory of the pool's own; the listener merges
  them at scrape time (`MultiProcessCollector`). It counts since `serve` started.
- **Read from live objects at scrape time** (`ServiceCollector`): IMAP fetcher state and the
  seconds since each fetcher's last sync, the rules version in force and reload failures, the
  templates file's version, connections inside and commits in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from sources.commits import MAX_GROUP_MESSAGES
from storage import repo
from storage.models import waited_seconds
from storage.states import Fate

if TYPE_CHECKING:
    from rules.reload import RulesHolder, TemplatesHolder
    from sources.imap import FolderFetcher
    from sources.smtp import Door, IntakeHandler

PROCESSING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
REPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, MAX_GROUP_MESSAGES)
FETCHER_STATES = ("connecting", "ok", "failing", "standby")

# --- processing time, observed by whoever processes -------------------------------------------

_processing: Histogram | None = None


def processing_histogram() -> Histogram:
    """The processing-time histogram of this process (created on first use, so that a worker
    process can switch to multiprocess files first)."""
    global _processing
    if _processing is None:
        _processing = Histogram(
            "mailintake_processing_seconds",
            "Time to process one message (parse, rules, ticket), by the process doing it",
            buckets=PROCESSING_BUCKETS,
            registry=None,
        )
    return _processing


def observe_processing(seconds: float) -> None:
    processing_histogram().observe(seconds)


def write_to_directory(path: Path) -> None:
    """In a worker process: keep this process's metrics in prometheus-client's multiprocess
    files under `path`, which the listener process reads at scrape time."""
    global _processing
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()
    _processing = None


# --- the ledger, read at scrape time ----------------------------------------------------------


@dataclass
class LedgerState:
    """What the ledger says about intake right now."""

    by_status: dict[str, int] = field(default_factory=dict)
    oldest_unprocessed: datetime | None = None
    retries_scheduled: int = 0

    @property
    def backlog(self) -> int:
        return self.by_status.get(Fate.RECEIVED, 0)

    def oldest_age(self, now: datetime | None = None) -> float:
        """Seconds the oldest unprocessed message has waited (0 without one)."""
        return waited_seconds(self.oldest_unprocessed, now)


def ledger_state(session: Session) -> LedgerState:
    """Three small queries (the status index serves them); no row is read whole."""
    return LedgerState(
        by_status=repo.count_by_status(session),
        oldest_unprocessed=repo.oldest_unprocessed_at(session),
        retries_scheduled=repo.retries_scheduled(session),
    )


class LedgerCollector(Collector):
    """Database-derived gauges, computed when scraped; nothing is reported if the database
    cannot be read (`mailintake_database_up` says so)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("mailintake_database_up", "1 if the ledger could be read")
        try:
            with self.sessions() as session:
                state = ledger_state(session)
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        fates = GaugeMetricFamily(
            "mailintake_messages", "Messages in the ledger by status (fate)", labels=["status"]
        )
        for status in Fate:
            fates.add_metric([status.value], state.by_status.get(status, 0))
        yield fates
        yield GaugeMetricFamily(
            "mailintake_backlog_messages",
            "Messages received but not processed yet",
            value=state.backlog,
        )
        yield GaugeMetricFamily(
            "mailintake_backlog_oldest_age_seconds",
            "How long the oldest unprocessed message has waited (0 without one)",
            value=state.oldest_age(),
        )
        yield GaugeMetricFamily(
            "mailintake_failed_messages",
            "Messages that failed and wait for a retry or a human",
            value=state.by_status.get(Fate.FAILED, 0),
        )
        yield GaugeMetricFamily(
            "mailintake_retries_scheduled",
            "Failed messages with an automatic retry scheduled",
            value=state.retries_scheduled,
        )


# --- live objects, read at scrape time --------------------------------------------------------


@dataclass
class Parts:
    """The service's parts metrics and readiness look at; filled as the service starts."""

    handler: IntakeHandler | None = None
    door: Door | None = None
    fetchers: Sequence[FolderFetcher] = ()
    rules: RulesHolder | None = None
    rules_reload_errors: Callable[[], int] | None = None
    templates: TemplatesHolder | None = None


class ServiceCollector(Collector):
    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Any]:
        parts = self.parts
        yield from self._smtp(parts)
        state = GaugeMetricFamily(
            "mailintake_imap_fetcher_state",
            "1 for the state each IMAP fetcher is in (connecting, ok, failing, standby: another "
            "node fetches the folder)",
            labels=["account", "folder", "state"],
        )
        since = GaugeMetricFamily(
            "mailintake_imap_seconds_since_success",
            "Seconds since each IMAP fetcher last synced its folder",
            labels=["account", "folder"],
        )
        stalled = GaugeMetricFamily(
            "mailintake_imap_stalled",
            "1 if the fetcher has not synced for imap.stalled_after_seconds",
            labels=["account", "folder"],
        )
        for fetcher in parts.fetchers:
            where = [fetcher.account.name, fetcher.folder]
            current = fetcher.state
            for name in FETCHER_STATES:
                state.add_metric([*where, name], 1 if current == name else 0)
            since.add_metric(where, fetcher.seconds_since_success)
            stalled.add_metric(where, 1 if fetcher.stalled else 0)
        yield from (state, since, stalled)
        if parts.rules is not None:
            rules = InfoMetricFamily("mailintake_rules", "The rules file in force")
            rules.add_metric([], {"version": parts.rules.current().version[:12]})
            yield rules
            yield GaugeMetricFamily(
                "mailintake_rules_reload_failing",
                "1 while the last edit of the rules file was refused (the last good rules stay)",
                value=0 if parts.rules.last_error is None else 1,
            )
        if parts.rules_reload_errors is not None:
            yield CounterMetricFamily(
                "mailintake_rules_reload_errors",
                "Edits of the rules file that were refused",
                value=parts.rules_reload_errors(),
            )
        if parts.templates is not None:
            templates = InfoMetricFamily("mailintake_templates", "The templates file in force")
            templates.add_metric([], {"version": parts.templates.version[:12]})
            yield templates

    def _smtp(self, parts: Parts) -> Iterator[Any]:
        if parts.handler is None or parts.door is None:
            return
        replies = CounterMetricFamily(
            "mailintake_smtp_replies",
            "SMTP/LMTP replies sent, by code (refused connections included)",
            labels=["code"],
        )
        codes = dict(parts.handler.replies)
        for refusal, count in parts.door.refusals.items():
            codes[refusal[:3]] = codes.get(refusal[:3], 0) + count
        for code, count in sorted(codes.items()):
            replies.add_metric([code], count)
        yield replies
        yield GaugeMetricFamily(
            "mailintake_smtp_connections",
            "SMTP/LMTP clients connected",
            value=len(parts.door.inside),
        )
        yield GaugeMetricFamily(
            "mailintake_smtp_commits_in_flight",
            "Ledger commits the SMTP/LMTP listener waits for",
            value=parts.handler.stores_in_flight,
        )
        yield CounterMetricFamily(
            "mailintake_smtp_auth_failures", "Failed SMTP logins", value=parts.handler.failed_logins
        )


class Metrics:
    """The registry `/metrics` shows: one per service, so tests can run several."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        parts: Parts,
        multiprocess_dir: Path | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "mailintake_messages_received",
            "Messages committed to the ledger, by source (smtp, lmtp, imap)",
            ["source"],
            registry=self.registry,
        )
        self.smtp_reply_seconds = Histogram(
            "mailintake_smtp_data_reply_seconds",
            "Time from the end of DATA to the reply (the ledger commit), by reply code",
            ["code"],
            buckets=REPLY_BUCKETS,
            registry=self.registry,
        )
        self.commit_messages = Histogram(
            "mailintake_ledger_commit_messages",
            "Messages per ledger commit of the SMTP/LMTP listener (group commit)",
            buckets=COMMIT_GROUP_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "mailintake_ledger_commit_seconds",
            "Time of one ledger commit of the SMTP/LMTP listener, its whole group",
            buckets=REPLY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(LedgerCollector(sessions))
        self.registry.register(ServiceCollector(parts))
        if multiprocess_dir is None:
            self.registry.register(processing_histogram())
        else:
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
        self.started = time.time()

    def smtp_replied(self, code: str, seconds: float) -> None:
        self.smtp_reply_seconds.labels(code).observe(seconds)

    def ledger_committed(self, messages: int, seconds: float) -> None:
        self.commit_messages.observe(messages)
        self.commit_seconds.observe(seconds)
