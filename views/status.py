"""The running picture of intake as the store tells it (`mailintake status`, `stats`); typed
results, so the web view shows the same thing. Every number comes from storage.repo, the
backlog ones from the same queries /metrics and /readyz use."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from storage import repo
from storage.models import waited_seconds
from storage.states import Fate


@dataclass(frozen=True)
class LastMessage:
    id: int
    received_at: datetime
    message_id: str | None


@dataclass(frozen=True)
class Checkpoint:
    account: str
    folder: str
    uidvalidity: int
    last_uid: int
    updated_at: datetime


@dataclass(frozen=True)
class LastTicket:
    key: str
    created_at: datetime
    rules_version: str | None


@dataclass(frozen=True)
class StoreStatus:
    """Backlog, failures, retries and the newest arrivals, as of `at`."""

    at: datetime
    backlog: int
    oldest_unprocessed_at: datetime | None
    oldest_unprocessed_age_seconds: float
    by_status: dict[str, int]
    failed_by_stage: dict[str, int]
    retries_scheduled: int
    retries_due: int
    last_by_source: dict[str, LastMessage] = field(default_factory=dict)
    imap_checkpoints: list[Checkpoint] = field(default_factory=list)
    last_ticket: LastTicket | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_status(session: Session, now: datetime) -> StoreStatus:
    by_status = repo.count_by_status(session)
    oldest = repo.oldest_unprocessed_at(session)
    ticket = repo.last_ticket(session)
    return StoreStatus(
        at=now,
        backlog=by_status.get(Fate.RECEIVED, 0),
        oldest_unprocessed_at=oldest,
        oldest_unprocessed_age_seconds=waited_seconds(oldest, now),
        by_status={fate.value: by_status.get(fate, 0) for fate in Fate},
        failed_by_stage=repo.failures_by_stage(session),
        retries_scheduled=repo.retries_scheduled(session),
        retries_due=repo.retries_due(session, now),
        last_by_source={
            row.source: LastMessage(row.id, row.received_at, row.message_id)
            for row in repo.last_received_by_source(session)
        },
        imap_checkpoints=[
            Checkpoint(c.account, c.folder, c.uidvalidity, c.last_uid, c.updated_at)
            for c in repo.imap_checkpoints(session)
        ],
        last_ticket=LastTicket(ticket.key, ticket.created_at, ticket.rules_version)
        if ticket
        else None,
    )


@dataclass(frozen=True)
class Stats:
    """Counts of what arrived since `since`: messages by source and fate, tickets by category
    and assignee (None: no category, nobody assigned)."""

    since: datetime
    by_source: dict[str, int]
    by_fate: dict[str, int]
    by_category: dict[str | None, int]
    by_assignee: dict[str | None, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_stats(session: Session, since: datetime) -> Stats:
    return Stats(
        since=since,
        by_source=repo.received_since_by(session, "source", since),
        by_fate=repo.received_since_by(session, "status", since),
        by_category=repo.tickets_since_by(session, "category", since),
        by_assignee=repo.tickets_since_by(session, "assignee", since),
    )
