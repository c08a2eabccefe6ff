"""Throughput of the durable core: receive() + process() per message, on SQLite and PostgreSQL.

    .venv/bin/python bench/ingest_bench.py [--messages 500] [--pg-url URL]

Prints messages per second and per-message latency percentiles for each backend. A benchmark,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from email.message import EmailMessage

from sqlalchemy import create_engine, text

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from storage import db


def sample(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "customer@example.com"
    msg["To"] = "inquiry@wine-importer.example.jp"
    msg["Subject"] = f"在庫の問い合わせ {n}"
    msg["Message-ID"] = f"<bench-{n}-{uuid.uuid4().hex}@example.com>"
    msg.set_content("ボルドーの在庫はありますか。\n" * 20)
    return msg.as_bytes()


def run(url: str, count: int) -> None:
    engine = db.make_engine(url)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    ctx = PipelineContext(Settings(database={"url": url}), sessions)
    mails = [sample(n) for n in range(count)]
    latencies = []
    start = time.perf_counter()
    for raw in mails:
        t0 = time.perf_counter()
        process(ctx, receive(sessions, raw, Envelope(source="file")))
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    print(
        f"{engine.dialect.name:10s} {count} messages in {elapsed:.2f}s: "
        f"{count / elapsed:.0f} msg/s, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"
    )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(f"sqlite:///{tmp}/bench.db", args.messages)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.pg_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        print(f"postgresql skipped: {exc.__class__.__name__}: {exc}")
        return
    try:
        run(f"{args.pg_url}?options=-csearch_path%3D{schema}", args.messages)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
