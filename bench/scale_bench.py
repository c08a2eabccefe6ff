"""Processing throughput on PostgreSQL with 1, 2, 3 ... worker processes claiming from one store.

    .venv/bin/python bench/scale_bench.py [--messages 600] [--workers 1,2,3] [--nodes 1]
                                          [--pg-url URL]

For each worker count: a fresh schema is filled with `--messages` waiting messages (committed
as a listener commits them), then the workers start (`processing.mode: process`, the pool
`mailintake serve` runs; with `--nodes N`, N pools side by side, as N nodes on one store) and
the time until the last message has its fate is measured. Prints messages per second, the
machine's load and how many processes took part. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from email.message import EmailMessage

from sqlalchemy import create_engine, func, select, text

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from sources.workers import WorkerPool
from storage import db
from storage.models import InboundMessage, ProcessingAttempt
from storage.states import Fate

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def sample(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"customer{n % 50}@example.com"
    msg["To"] = "inquiry@wine-importer.example.jp"
    msg["Subject"] = f"在庫の問い合わせ {n}"
    msg["Message-ID"] = f"<scale-{n}-{uuid.uuid4().hex}@example.com>"
    msg.set_content("ボルドーの在庫はありますか。\n電話 03-1234-5678\n" * 20)
    return msg.as_bytes()


def run(base_url: str, messages: int, workers: int, nodes: int) -> None:
    schema = f"scale_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        sessions = db.make_session_factory(engine)
        for n in range(messages):
            receive(sessions, sample(n), Envelope(source="smtp"))
        settings = Settings(
            database={"url": url},
            processing={"mode": "process", "workers": workers, "rescan_seconds": 0.5},
        )
        pools = [WorkerPool(settings) for _ in range(nodes)]
        start = time.perf_counter()
        for pool in pools:
            pool.start()
        with engine.connect() as conn:
            query = select(func.count()).where(InboundMessage.status == Fate.RECEIVED)
            while conn.scalar(query):
                conn.rollback()
                time.sleep(0.05)
        elapsed = time.perf_counter() - start
        load = os.getloadavg()[0]
        for pool in pools:
            pool.stop(30)
        attempts = select(
            func.count(func.distinct(ProcessingAttempt.pid)),
            func.min(ProcessingAttempt.attempted_at),
            func.max(ProcessingAttempt.attempted_at),
        )
        with engine.connect() as conn:
            pids, first, last = conn.execute(attempts).one()
        steady = (messages - 1) / (last - first).total_seconds()  # without the workers' start
        print(
            f"{nodes} node(s) x {workers} worker(s): {messages} messages in {elapsed:.2f} s "
            f"with the start, {steady:.0f} msg/s from first to last fate "
            f"({pids} processes took part; load {load:.1f})",
            flush=True,
        )
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated")
    parser.add_argument("--nodes", type=int, default=1, help="pools side by side (nodes)")
    parser.add_argument("--pg-url", default=PG_URL)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; processing throughput on PostgreSQL", flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        run(args.pg_url, args.messages, workers, args.nodes)


if __name__ == "__main__":
    main()
