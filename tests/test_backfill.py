"""Backfill batches (sources/backfill.py): bounded groups, one transaction each, processed in
file order so a reply later in the mbox finds the ticket its original opened. The kill-and-rerun
promise is tested end to end in test_cli.py (test_sigkill_mid_ingest_then_rerun_...)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import func, select

from pipeline.process import process_in_order
from sources import backfill as backfill_module
from sources.backfill import BATCH_MESSAGES, backfill, batches
from sources.files import FileMessage
from storage.models import InboundMessage
from storage.states import Fate, Source
from tests.mails import simple_mail


def message(raw: bytes, n: int = 0) -> FileMessage:
    return FileMessage(raw, f"test.mbox#{n}", Source.FILE)


def test_batches_end_at_the_message_count_or_the_byte_budget(monkeypatch):
    small = [message(b"x" * 10, n) for n in range(BATCH_MESSAGES * 2 + 5)]
    assert [len(b) for b in batches(small)] == [BATCH_MESSAGES, BATCH_MESSAGES, 5]
    monkeypatch.setattr(backfill_module, "BATCH_BYTES", 100)
    sizes = [60, 30, 20, 150, 10]
    grouped = batches(message(b"x" * size, n) for n, size in enumerate(sizes))
    assert [[len(m.raw) for m in b] for b in grouped] == [[60, 30], [20], [150], [10]]


def test_backfill_stores_each_batch_then_processes_it_in_order(pipeline):
    original = simple_mail(subject="在庫の問い合わせ", message_id="<first@example.com>")
    reply = simple_mail(
        subject="Re: 在庫の問い合わせ",
        message_id="<reply@example.com>",
        headers={"In-Reply-To": "<first@example.com>"},
    )
    stored_when_processed = []

    def run(ids: Sequence[int]) -> Iterator[Fate | None]:
        for fate in process_in_order(pipeline, ids):
            with pipeline.sessions() as session:
                stored = session.scalar(select(func.count(InboundMessage.id)))
            stored_when_processed.append(stored)
            yield fate

    mails = [message(original, 0), message(reply, 1)]
    done = list(backfill(pipeline.sessions, mails, run))
    assert [fate for _, fate in done] == [Fate.TICKET, Fate.COMMENT]
    assert done[0][0] < done[1][0]
    assert stored_when_processed == [2, 2], "the whole batch is committed before processing"
