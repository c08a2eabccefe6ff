"""Compare SMTP intake: aiosmtpd's do-nothing server, `mailintake serve`, Postfix's smtp-sink.

    .venv/bin/python bench/smtp_bench.py [--small 2000] [--large 300] [--sessions 8]
                                         [--rate 100] [--seconds 60] [--workers 1]
                                         [--database-url URL] [--skip-paced]
                                         [--tree PATH ...]

In one run, against each server (each started fresh on a free port; mailintake with a fresh
throw-away SQLite database per start, or `--database-url` (its backlogs then add up), and
processing in `--workers` worker processes, as in production):
1. `smtp-source -s 8 -d` sends `--small` 2 KB and `--large` 260 KB messages: messages per second
   from its wall time (the asyncio client instead when smtp-source is not installed);
2. a paced asyncio client offers `--rate` messages per second for `--seconds` seconds over 8
   connections and times, per message, the end of DATA to the reply: p50 and p99;
3. for mailintake, the backlog: ledger rows still `received` when the senders finish;
4. for every server, the CPU its own process used per message in the bursts (the listener's
   cost; mailintake's worker processes are not counted there) and, for mailintake, how many
   cores its workers used meanwhile: what a burst costs, apart from what the machine gave.
It prints the figures and the ratios to aiosmtpd's do-nothing server. `--tree PATH` (repeatable)
also runs `mailintake serve` from another checkout of the project (say, `git archive` of an
earlier commit), in the same run: before/after figures on equally loaded machines. A benchmark,
not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sqlalchemy import func, select

from storage import db
from storage.models import InboundMessage
from storage.states import Fate

RECIPIENT = "inquiry@wine-importer.example.jp"
SENDER = "bench@denwa-daiko.example.com"
LISTENING = re.compile(r"listening for SMTP on 127\.0\.0\.1:(\d+)")
WORKER_STARTED = re.compile(r"worker-\d+ started")
SMALL, LARGE = 2 * 1024, 260 * 1024
CONNECTIONS = 8

DO_NOTHING = """
import asyncio, sys
from aiosmtpd.controller import Controller

class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

controller = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]),
                        data_size_limit=None)
controller.start()
print("ready", flush=True)
sys.stdin.read()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not start")


@dataclass
class Server:
    name: str
    start: Callable[[], tuple[subprocess.Popen[bytes], int]]
    backlog: Callable[[], int | None] = lambda: None
    results: dict[str, str] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)


def start_do_nothing() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", DO_NOTHING, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    wait_port(port, proc, "aiosmtpd do-nothing")
    return proc, port


def start_sink() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    tool = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    proc = subprocess.Popen(
        [tool, "-u", "nobody", "-c", f"127.0.0.1:{port}", "1000"], stdout=subprocess.DEVNULL
    )
    wait_port(port, proc, "smtp-sink")
    return proc, port


def start_mailintake(
    url: str, workdir: Path, workers: int, tree: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """`mailintake serve` of this checkout, or of `tree` (its modules first on the path)."""
    log_path = workdir / f"serve-{time.monotonic_ns()}.log"
    env = os.environ | {
        "MAILINTAKE_DATABASE__URL": url,
        "MAILINTAKE_SMTP__PORT": "0",
        "MAILINTAKE_SMTP__MAX_CONNECTIONS": "200",
        "MAILINTAKE_INTAKE__MAX_MESSAGE_BYTES": str(10 * 1024 * 1024),
        "MAILINTAKE_PROCESSING__MODE": "process",
        "MAILINTAKE_PROCESSING__WORKERS": str(workers),
    }
    env.pop("MAILINTAKE_CONFIG", None)
    command = [str(Path(sys.executable).parent / "mailintake"), "serve"]
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        command = [sys.executable, "-c", "import cli; cli.main()", "serve"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # listening, and every worker ready
        text = log_path.read_text(errors="replace")
        found = LISTENING.search(text)
        if found and len(WORKER_STARTED.findall(text)) >= workers:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"mailintake serve did not start:\n{log_path.read_text(errors='replace')}")


def start_tree(
    ledger: Ledger, workdir: Path, workers: int, tree: Path
) -> tuple[subprocess.Popen[bytes], int]:
    return start_mailintake(ledger.fresh(), workdir, workers, tree.resolve())


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (mailintake's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def smtp_source(port: int, messages: int, size: int, sessions: int) -> float:
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    command = [tool, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    command += ["-f", SENDER, "-t", RECIPIENT, "-M", "bench.example.jp", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
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
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> bytes:
    writer.write(text.encode() + b"\r\n")
    await writer.drain()
    return await reply(reader)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader)
        await command(reader, writer, "EHLO bench.example.jp")
        return cls(reader, writer)

    async def send(self, data: bytes) -> tuple[bool, float]:
        """One transaction; whether it got 250 and the end-of-DATA-to-reply seconds."""
        await command(self.reader, self.writer, f"MAIL FROM:<{SENDER}>")
        await command(self.reader, self.writer, f"RCPT TO:<{RECIPIENT}>")
        await command(self.reader, self.writer, "DATA")
        self.writer.write(data + b".\r\n")
        await self.writer.drain()
        sent = time.perf_counter()
        answer = await reply(self.reader)
        return answer.startswith(b"250"), time.perf_counter() - sent

    async def close(self) -> None:
        await command(self.reader, self.writer, "QUIT")
        self.writer.close()
        await self.writer.wait_closed()


async def paced(port: int, rate: float, seconds: float, size: int) -> tuple[int, list[float]]:
    """Offer `rate` messages per second for `seconds`; accepted count and latencies."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(await Connection.open(port))
    latencies: list[float] = []
    accepted = 0

    async def one(data: bytes) -> None:
        nonlocal accepted
        conn = await idle.get()
        ok, latency = await conn.send(data)
        accepted += ok
        latencies.append(latency)
        idle.put_nowait(conn)

    total = int(rate * seconds)
    started = time.perf_counter()
    tasks = []
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(message(size))))
    await asyncio.gather(*tasks)
    for _ in range(CONNECTIONS):
        await (await idle.get()).close()
    return accepted, latencies


async def burst(port: int, messages: int, size: int, sessions: int) -> float:
    """The asyncio client's stand-in for smtp-source: messages per second."""
    data = message(size)

    async def session(count: int) -> None:
        conn = await Connection.open(port)
        for _ in range(count):
            await conn.send(data)
        await conn.close()

    started = time.perf_counter()
    shares = [messages // sessions + (i < messages % sessions) for i in range(sessions)]
    await asyncio.gather(*(session(n) for n in shares))
    return messages / (time.perf_counter() - started)


def received_rows(url: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).where(InboundMessage.status == Fate.RECEIVED)
            return conn.scalar(query) or 0
    finally:
        engine.dispose()


class Ledger:
    """A fresh database for each mailintake start (SQLite), so each backlog is its own run's."""

    def __init__(self, given: str | None, workdir: Path) -> None:
        self.given, self.workdir, self.runs = given, workdir, 0
        self.url = given or ""

    def fresh(self) -> str:
        self.runs += 1
        if not self.given:
            self.url = f"sqlite:///{self.workdir / f'bench-{self.runs}.db'}"
        engine = db.make_engine(self.url)
        db.upgrade(engine)
        engine.dispose()
        return self.url

    def backlog(self) -> int:
        return received_rows(self.url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(server: Server, args: argparse.Namespace) -> None:
    have_source = Path(shutil.which("smtp-source") or "/usr/sbin/smtp-source").exists()
    for label, count, size in (("2 KB", args.small, SMALL), ("260 KB", args.large, LARGE)):
        proc, port = server.start()
        try:
            workers = child_pids(proc.pid)
            cpu_before = [cpu_seconds(pid) for pid in (proc.pid, *workers)]
            started = time.perf_counter()
            if have_source:
                rate = smtp_source(port, count, size, args.sessions)
            else:
                rate = asyncio.run(burst(port, count, size, args.sessions))
            wall = time.perf_counter() - started
            used = [
                cpu_seconds(pid) - b
                for pid, b in zip((proc.pid, *workers), cpu_before, strict=True)
            ]
            backlog = server.backlog()  # when the senders are done
        finally:
            stop(proc)
        server.rates[label] = rate
        extra = f", backlog {backlog} received" if backlog is not None else ""
        extra += f", listener CPU {used[0] / count * 1000:.2f} ms/msg"
        if workers:
            extra += f", workers {sum(used[1:]) / wall:.2f} cores"
        server.results[label] = f"{rate:.0f} msg/s{extra}"
        print(f"{server.name}: {count} x {label}: {server.results[label]}", flush=True)
    if args.skip_paced:
        return
    proc, port = server.start()
    try:
        accepted, latencies = asyncio.run(paced(port, args.rate, args.seconds, SMALL))
        backlog = server.backlog()
    finally:
        stop(proc)
    q = statistics.quantiles(latencies, n=100)
    extra = f", backlog {backlog} received" if backlog is not None else ""
    server.results["paced"] = (
        f"{accepted}/{len(latencies)} accepted, p50 {q[49] * 1000:.1f} ms, "
        f"p99 {q[98] * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms{extra}"
    )
    print(f"{server.name}: {args.rate:g} msg/s x {args.seconds:g} s: {server.results['paced']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000, help="2 KB messages")
    parser.add_argument("--large", type=int, default=300, help="260 KB messages")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rate", type=float, default=100, help="paced run: messages per second")
    parser.add_argument("--seconds", type=float, default=60, help="paced run: duration")
    parser.add_argument("--workers", type=int, default=1, help="mailintake worker processes")
    parser.add_argument("--database-url", help="default: a throw-away SQLite file")
    parser.add_argument("--skip-paced", action="store_true")
    parser.add_argument("--only", help="comma-separated: aiosmtpd,mailintake,smtp-sink")
    parser.add_argument(
        "--tree", type=Path, action="append", default=[], help="also run serve from this checkout"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smtp-bench-") as tmp:
        workdir = Path(tmp)
        ledger = Ledger(args.database_url, workdir)
        servers = [
            Server("aiosmtpd do-nothing", start_do_nothing),
            Server(
                f"mailintake serve ({args.workers} worker)",
                lambda: start_mailintake(ledger.fresh(), workdir, args.workers),
                ledger.backlog,
            ),
        ]
        for tree in args.tree:
            servers.append(
                Server(
                    f"mailintake serve @ {tree} ({args.workers} worker)",
                    partial(start_tree, ledger, workdir, args.workers, tree),
                    ledger.backlog,
                )
            )
        if Path(shutil.which("smtp-sink") or "/usr/sbin/smtp-sink").exists():
            servers.append(Server("smtp-sink", start_sink))
        if args.only:
            wanted = args.only.split(",")
            servers = [s for s in servers if any(s.name.startswith(w) for w in wanted)]
        where = args.database_url or "a fresh SQLite file per run"
        print(f"{os.cpu_count()} CPUs; smtp-source -s {args.sessions}; database: {where}")
        for server in servers:
            run(server, args)
        base = servers[0].rates
        print("\n| server | 2 KB | 260 KB | paced |")
        print("|---|---|---|---|")
        for server in servers:
            cells = []
            for label in ("2 KB", "260 KB"):
                ratio = server.rates.get(label, 0) / base[label] if base.get(label) else 0
                cells.append(f"{server.results.get(label, '-')} ({ratio:.2f}x)")
            print(f"| {server.name} | {' | '.join(cells)} | {server.results.get('paced', '-')} |")


if __name__ == "__main__":
    main()
