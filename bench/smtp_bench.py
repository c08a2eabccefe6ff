"""Drive `mailintake serve` over SMTP: accepted messages per second, end-of-DATA-to-reply latency.

    .venv/bin/python bench/smtp_bench.py [--messages 2000] [--sessions 10] [--size 4096]
                                         [--database-url URL]

Starts `mailintake serve` as a child process on a free port with a throw-away SQLite database
(or `--database-url`, migrated first), then
1. Postfix's `smtp-source` (if installed; Postfix itself is not started) sends `--messages`
   messages over `--sessions` parallel connections: messages per second from its wall time;
2. an asyncio client with the same concurrency sends as many again and times, per message, the
   span from writing the final "." of DATA to reading the reply: p50 and p99.
At the end it checks that the ledger holds every acknowledged message. The processing worker
runs meanwhile, as in production. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import func, select

from storage import db
from storage.models import InboundMessage

RECIPIENT = "inquiry@wine-importer.example.jp"
SENDER = "bench@denwa-daiko.example.com"
LISTENING = re.compile(r"listening for SMTP on 127\.0\.0\.1:(\d+)")


def start_server(url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`mailintake serve` on a free port; returns the process, the port and its log file."""
    log_path = workdir / "serve.log"
    env = os.environ | {"MAILINTAKE_DATABASE__URL": url, "MAILINTAKE_SMTP__PORT": "0"}
    env.pop("MAILINTAKE_CONFIG", None)
    command = [str(Path(sys.executable).parent / "mailintake"), "serve"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = LISTENING.search(log_path.read_text(errors="replace"))
        if found:
            return proc, int(found.group(1)), log_path
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"mailintake serve did not start:\n{log_path.read_text(errors='replace')}")


def run_smtp_source(port: int, messages: int, sessions: int, size: int) -> float | None:
    """Messages per second through smtp-source, or None when it is not installed."""
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(tool).exists():
        print("smtp-source: not installed (Debian package postfix); skipped")
        return None
    command = [tool, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    command += ["-f", SENDER, "-t", RECIPIENT, "-M", "bench.example.jp", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return messages / (time.perf_counter() - started)


def message(size: int) -> bytes:
    body = ("ボルドー赤の在庫確認をお願いします。" * (size // 54 + 1)).encode()[:size]
    lines = [body[i : i + 900] for i in range(0, len(body), 900)]
    head = (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@bench.example.jp>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    return head + b"\r\n".join(lines) + b"\r\n"


async def reply(reader: asyncio.StreamReader) -> bytes:
    """A whole (possibly multi-line) reply; its last line."""
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> bytes:
    writer.write(text.encode() + b"\r\n")
    await writer.drain()
    return await reply(reader)


async def session(port: int, count: int, size: int, latencies: list[float]) -> int:
    """Send `count` messages over one connection; returns how many got 250."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    accepted = 0
    try:
        await reply(reader)
        await command(reader, writer, "EHLO bench.example.jp")
        for _ in range(count):
            await command(reader, writer, f"MAIL FROM:<{SENDER}>")
            await command(reader, writer, f"RCPT TO:<{RECIPIENT}>")
            await command(reader, writer, "DATA")
            writer.write(message(size) + b".\r\n")
            await writer.drain()
            sent = time.perf_counter()
            answer = await reply(reader)
            latencies.append(time.perf_counter() - sent)
            accepted += answer.startswith(b"250")
        await command(reader, writer, "QUIT")
    finally:
        writer.close()
        await writer.wait_closed()
    return accepted


async def run_latency_client(port: int, messages: int, sessions: int, size: int) -> None:
    latencies: list[float] = []
    per_session = [messages // sessions + (i < messages % sessions) for i in range(sessions)]
    started = time.perf_counter()
    accepted = await asyncio.gather(*(session(port, n, size, latencies) for n in per_session))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    print(
        f"asyncio client: {sum(accepted)}/{messages} accepted in {elapsed:.2f}s: "
        f"{sum(accepted) / elapsed:.0f} msg/s; end of DATA to reply: "
        f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )


def ledger_count(url: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(InboundMessage)) or 0
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096, help="body bytes per message")
    parser.add_argument("--database-url", help="default: a throw-away SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smtp-bench-") as tmp:
        workdir = Path(tmp)
        url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        before = ledger_count(url)
        proc, port, log_path = start_server(url, workdir)
        try:
            print(f"mailintake serve on 127.0.0.1:{port}, database {url}")
            print(f"{args.messages} messages x 2, {args.sessions} sessions, {args.size} B bodies")
            rate = run_smtp_source(port, args.messages, args.sessions, args.size)
            if rate is not None:
                print(f"smtp-source: {rate:.0f} msg/s accepted")
            asyncio.run(run_latency_client(port, args.messages, args.sessions, args.size))
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
        stored = ledger_count(url) - before
        refused = log_path.read_text(errors="replace").count("answered 451")
        print(f"ledger: {stored} new rows, {refused} answered 451; serve exited {code}")


if __name__ == "__main__":
    main()
