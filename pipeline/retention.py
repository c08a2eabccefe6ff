"""Retention: `mailintake purge` empties the raw bytes and attachment contents of messages
whose fate is final (ticket, comment, duplicate, dropped) and that are older than a cutoff.

The ledger rows, tickets, comments and attachment rows stay, with sha256 and size; only the
bytes go (storage.models.purged tells an emptied value). Failed, discarded and unprocessed
messages keep everything: they may still be replayed or looked at. An attachment content
shared with a message that keeps its bytes stays too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage import repo

BATCH = 500  # rows per transaction: short locks, and well under SQLite's parameter limit


@dataclass(frozen=True)
class PurgePlan:
    """What a purge with this cutoff empties."""

    before: datetime
    messages: Sequence[tuple[int, int]]  # (ledger id, raw bytes)
    blobs: Sequence[tuple[str, int]]  # (sha256, content bytes)

    def summary(self) -> dict[str, Any]:
        ids = [inbound_id for inbound_id, _size in self.messages]
        return {
            "received_before": self.before,
            "messages": len(ids),
            "raw_bytes": sum(size for _id, size in self.messages),
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
            "attachment_blobs": len(self.blobs),
            "attachment_bytes": sum(size for _sha, size in self.blobs),
        }

    @property
    def steps(self) -> int:
        return len(self.messages) + len(self.blobs)


def plan_purge(sessions: sessionmaker[Session], before: datetime) -> PurgePlan:
    with sessions() as session:
        messages = [(i, size) for i, size in repo.raw_to_purge(session, before)]
        blobs = [(sha, size) for sha, size in repo.blobs_to_purge(session, before)]
    return PurgePlan(before, messages, blobs)


def purge(
    sessions: sessionmaker[Session], plan: PurgePlan, advance: Callable[[int], None]
) -> tuple[int, int]:
    """Carry out `plan` in batches, each committed; returns (messages, blobs) emptied.
    `advance(n)` is called after each batch (a progress bar)."""
    emptied = [0, 0]
    jobs: tuple[tuple[int, list[Any], Callable[[Session, Any], int]], ...] = (
        (0, [i for i, _size in plan.messages], repo.purge_raw),
        (1, [sha for sha, _size in plan.blobs], partial(repo.purge_blobs, before=plan.before)),
    )
    for slot, keys, empty in jobs:
        for start in range(0, len(keys), BATCH):
            batch = keys[start : start + BATCH]
            with sessions.begin() as session:
                emptied[slot] += empty(session, batch)
            advance(len(batch))
    return emptied[0], emptied[1]
