"""`mailintake serve` as a process: it listens, stores, and stops on SIGTERM with exit code 0."""

from __future__ import annotations

import os
import queue
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import db
from storage.models import InboundMessage, MessageStatus
from tests.mails import simple_mail

MAILINTAKE = Path(sys.executable).parent / "mailintake"
LISTENING = re.compile(r"listening for SMTP on 127\.0\.0\.1:(\d+)")


class ServeProcess:
    """A `mailintake serve` child whose stderr is read line by line in a thread."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        if not MAILINTAKE.exists():
            pytest.skip(f"{MAILINTAKE} is absent: install the project (pip install -e .)")
        self.db_url = f"sqlite:///{tmp_path / 'serve.db'}"
        env = os.environ | {
            "MAILINTAKE_DATABASE__URL": self.db_url,
            "MAILINTAKE_SMTP__PORT": str(port),
            "MAILINTAKE_SMTP__SHUTDOWN_GRACE_SECONDS": "5",
        }
        env.pop("MAILINTAKE_CONFIG", None)
        self.proc = subprocess.Popen(
            [str(MAILINTAKE), "serve"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            found = pattern.search(line)
            if found:
                return found
        raise AssertionError(f"no line matching {pattern.pattern!r} in:\n{''.join(self.seen)}")

    def finish(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(timeout)  # until end of output
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    @property
    def output(self) -> str:
        return "".join(self.seen)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(10)
        if child.proc.stderr is not None:
            child.proc.stderr.close()


def test_serve_stores_a_message_and_exits_0_on_sigterm(tmp_path, serve_process):
    child = ServeProcess(tmp_path, port=0)
    serve_process.append(child)
    port = int(child.wait_for_line(LISTENING).group(1))
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(
            "customer@example.com",
            ["inquiry@wine-importer.example.jp"],
            simple_mail(message_id="<serve-1@example.com>").replace(b"\n", b"\r\n"),
        )
    child.wait_for_line(re.compile(r"<serve-1@example.com>, \d+ bytes: stored as ledger id 1"))
    child.wait_for_line(re.compile(r"message 1 .*ticket"))
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    assert "SIGTERM received" in child.output
    engine = db.make_engine(child.db_url)
    try:
        with engine.connect() as conn:
            status = conn.scalar(select(InboundMessage.status))
    finally:
        engine.dispose()
    assert status == MessageStatus.TICKET


def test_serve_on_a_taken_port_exits_2_saying_so(tmp_path, serve_process):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        child = ServeProcess(tmp_path, port=port)
        serve_process.append(child)
        code = child.finish()
    assert code == 2, child.output
    expected = f"error: cannot listen for SMTP on 127.0.0.1:{port}: Address already in use"
    assert expected in " ".join(child.output.split())
