"""Backfill (`mailintake ingest` of many files or a big mbox): the ledger written in batches.

A batch is one transaction (one commit for up to BATCH_MESSAGES messages instead of one each):
its messages are all stored or none is; a file has no sender to acknowledge, and a rerun reads
them again. The stored messages are then processed in file order, one by one, by
`pipeline.process.process_in_order` under their leases (each next lease taken in the
transaction that stores the previous outcome), so a killed ingest leaves rows `received` (or
leased by a dead process) that the next run's `process_pending` takes over, and a message read
twice is recognised as a `duplicate` of its first record, never a second ticket.

Processing stays in this one process and in order: a reply later in the mbox must find the
ticket its original opened. Worker processes (tried, see docs/performance.md) took messages
out of order, so replies whose original was not stored yet opened tickets of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from sqlalchemy.orm import Session, sessionmaker

from ingest.intake import receive_batch
from sources.files import FileMessage
from storage.states import Fate

BATCH_MESSAGES = 100  # messages per ledger transaction
BATCH_BYTES = 16 * 1024 * 1024  # a batch also ends at this many raw bytes: memory stays bounded


def batches(messages: Iterable[FileMessage]) -> Iterator[list[FileMessage]]:
    """The messages in groups of at most BATCH_MESSAGES and (after the first) BATCH_BYTES."""
    batch: list[FileMessage] = []
    size = 0
    for message in messages:
        if batch and (len(batch) >= BATCH_MESSAGES or size + len(message.raw) > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(message)
        size += len(message.raw)
    if batch:
        yield batch


def backfill(
    sessions: sessionmaker[Session],
    messages: Iterable[FileMessage],
    process: Callable[[Sequence[int]], Iterable[Fate | None]],
) -> Iterator[tuple[int, Fate | None]]:
    """Store `messages` batch by batch, and after each commit process the batch in order
    (`process` takes the batch's ledger ids and yields a fate for each, as
    `pipeline.process.process_in_order` does: one commit per message); yields each message's
    ledger id and fate (None: not processed here)."""
    for batch in batches(messages):
        ids = receive_batch(sessions, [(m.raw, m.envelope()) for m in batch])
        yield from zip(ids, process(ids), strict=True)
