"""How long processing holds SQLite's write lock: first INSERT/UPDATE to COMMIT of each
processing transaction, the time the SMTP listener's ledger commit may have to wait.

    .venv/bin/python bench/lock_hold_bench.py [--messages 400]

Receives the mails first, then runs `process_pending` with the shipped config.yaml; prints the
mean and p99 hold per message and the share of processing time under the lock. A benchmark,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from sqlalchemy import event

from config import load_settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process_pending
from storage import db

WRITES = ("INSERT", "UPDATE", "DELETE")


def sample(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"customer{n}@example.com"
    msg["To"] = "inquiry@wine-importer.example.jp"
    msg["Subject"] = f"在庫の問い合わせ {n}"
    msg["Message-ID"] = f"<lock-{n}-{uuid.uuid4().hex}@example.com>"
    msg.set_content("ボルドーの在庫はありますか。\n" * 20)
    return msg.as_bytes()


def run(url: str, count: int) -> None:
    settings = load_settings(Path("config.yaml"))
    settings.database.url = url
    engine = db.make_engine(url)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    for n in range(count):
        receive(sessions, sample(n), Envelope(source="file"))
    first: dict[int, float] = {}
    holds: list[float] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _write(conn: Any, _cur: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip()[:6].upper() in WRITES and id(conn) not in first:
            first[id(conn)] = time.perf_counter()

    @event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        started = first.pop(id(conn), None)
        if started is not None:
            holds.append(time.perf_counter() - started)

    @event.listens_for(engine, "rollback")
    def _rollback(conn: Any) -> None:
        first.pop(id(conn), None)

    start = time.perf_counter()
    process_pending(PipelineContext(settings, sessions))
    elapsed = time.perf_counter() - start
    holds = holds[1:]  # the first commit takes the first lease before any processing
    q = statistics.quantiles(holds, n=100)
    print(
        f"{count} messages in {elapsed:.2f}s ({count / elapsed:.0f} msg/s): write lock held "
        f"mean {statistics.mean(holds) * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms per message, "
        f"{sum(holds) / elapsed:.0%} of the time"
    )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(f"sqlite:///{tmp}/bench.db", args.messages)


if __name__ == "__main__":
    main()
