"""Failed messages: choose them, replay them through `process`, retry transient ones, discard.

A replay reads the stored raw bytes through today's code and rules, one message per transaction,
so one bad message never holds back the others. It is safe beside `mailintake serve` and beside
another replay: `process` claims a message with a status transition that only one transaction
can win, so a message makes one ticket at most however often and wherever it is replayed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

from sqlalchemy.orm import Session, sessionmaker

from pipeline.attempts import record_attempt
from pipeline.process import PipelineContext, process
from storage import repo
from storage.models import InboundMessage, utcnow
from storage.states import Fate

SKIPPED = "skipped"  # not processable any more: done meanwhile (by serve or another replay)
MISSING = "missing"  # no such ledger id
OUTCOMES = (*(s.value for s in Fate if s != Fate.RECEIVED), SKIPPED, MISSING)
NOT_FAILED = "not_failed"

AGO_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
AGO_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, zone: tzinfo, now: datetime | None = None) -> datetime:
    """`90s`, `30m`, `12h`, `2d` or `1w` ago, or an ISO 8601 date/time (without an offset: in
    `zone`, the configured time zone)."""
    ago = AGO_RE.match(text)
    if ago:
        amount, unit = int(ago.group(1)), AGO_UNITS[ago.group(2)]
        return (now or utcnow()) - timedelta(**{unit: amount})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration like 2d, 12h, 30m nor an ISO date like 2026-11-20"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


@dataclass
class ReplayResult:
    """What happened to each message of a replay, by ledger id, in replay order."""

    outcomes: dict[int, str] = field(default_factory=dict)

    @property
    def still_failed(self) -> list[int]:
        return [i for i, outcome in self.outcomes.items() if outcome == Fate.FAILED]

    @property
    def missing(self) -> list[int]:
        return [i for i, outcome in self.outcomes.items() if outcome == MISSING]

    @property
    def ok(self) -> bool:
        """Every message now has a fate other than failed."""
        return not self.still_failed and not self.missing

    def counts(self) -> dict[str, int]:
        found = Counter(self.outcomes.values())
        return {outcome: found.get(outcome, 0) for outcome in OUTCOMES}


def select_failed(sessions: sessionmaker[Session], wanted: repo.FailedFilter) -> list[int]:
    with sessions() as session:
        return list(repo.failed_ids(session, wanted))


def replay(
    ctx: PipelineContext, ids: Iterable[int], on_done: Callable[[], None] | None = None
) -> ReplayResult:
    """Process each message again; database outages propagate (nothing is marked then)."""
    wanted = list(dict.fromkeys(ids))
    with ctx.sessions() as session:
        known = repo.statuses_of(session, wanted)
    result = ReplayResult()
    for inbound_id in wanted:
        fate = process(ctx, inbound_id) if inbound_id in known else MISSING
        result.outcomes[inbound_id] = str(fate) if fate else _unprocessed_outcome(ctx, inbound_id)
        if on_done:
            on_done()
    return result


def _unprocessed_outcome(ctx: PipelineContext, inbound_id: int) -> str:
    """`process` left the message alone: `failed` if it can never be replayed (never fetched
    from IMAP: there are no bytes), else `skipped` (done, or being done, by another process)."""
    with ctx.sessions() as session:
        unfetched = repo.is_unfetched(session, inbound_id)
    return Fate.FAILED.value if unfetched else SKIPPED


def retry_due(ctx: PipelineContext, now: datetime | None = None, limit: int = 100) -> ReplayResult:
    """One pass of automatic retry: replay the transient failures whose time has come.

    The `mailintake serve` worker calls this whenever it runs out of new messages. The pipeline
    schedules `next_attempt_at` with backoff only for transient failures and only while attempts
    remain, so deterministic failures (parse, rules) are never picked here.
    """
    with ctx.sessions() as session:
        ids = repo.due_for_retry(session, now or utcnow(), limit)
    return replay(ctx, ids)


def discard(sessions: sessionmaker[Session], ids: Iterable[int], reason: str) -> dict[int, str]:
    """Mark failed messages handled; each id maps to `discarded`, `not_failed` or `missing`.

    The row, its raw bytes and its error stay for audit; the history records who discarded it.
    """
    results: dict[int, str] = {}
    for inbound_id in dict.fromkeys(ids):
        with sessions.begin() as session:
            if repo.discard(session, inbound_id, reason):
                record_attempt(session, inbound_id, Fate.DISCARDED)
                results[inbound_id] = Fate.DISCARDED.value
            elif session.get(InboundMessage, inbound_id) is None:
                results[inbound_id] = MISSING
            else:
                results[inbound_id] = NOT_FAILED
    return results
