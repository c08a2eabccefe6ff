"""Running the service in tests: in a thread (`ServiceThread`) or as a real process
(`ServeProcess`). Waiting for an outcome is `wait_for` (from tests/waiting.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from pipeline.process import PipelineContext
from sources.service import Service
from tests.waiting import WAIT_SECONDS, wait_for

__all__ = ["LISTENING", "ServeProcess", "ServiceThread", "serve_with", "wait_for"]

MAILINTAKE = Path(sys.executable).parent / "mailintake"
LISTENING = re.compile(r"listening for SMTP on 127\.0\.0\.1:(\d+)")


class ServeProcess:
    """A `mailintake serve` child whose stderr is read line by line in a thread."""

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        db_url: str | None = None,
        env: dict[str, str] | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        """`db_url` defaults to a new SQLite file in `tmp_path`; `env` adds MAILINTAKE_*
        settings, `options` go before `serve` (`-v`)."""
        if not MAILINTAKE.exists():
            pytest.skip(f"{MAILINTAKE} is absent: install the project (pip install -e .)")
        self.db_url = db_url or f"sqlite:///{tmp_path / 'serve.db'}"
        env = (
            os.environ
            | {
                "MAILINTAKE_DATABASE__URL": self.db_url,
                "MAILINTAKE_SMTP__PORT": str(port),
                "MAILINTAKE_SMTP__SHUTDOWN_GRACE_SECONDS": "5",
                "MAILINTAKE_HTTP__PORT": "0",  # any free port: 9025 may be taken
            }
            | (env or {})
        )
        env.pop("MAILINTAKE_CONFIG", None)
        self.proc = subprocess.Popen(
            [str(MAILINTAKE), *options, "serve"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        # ValueError: the serve_processes fixture closed the pipe after killing the process,
        # while its worker processes still held it open.
        with contextlib.suppress(ValueError):
            for line in self.proc.stderr:
                self.lines.put(line)

    def wait_for_line(
        self, pattern: re.Pattern[str], timeout: float = WAIT_SECONDS
    ) -> re.Match[str]:
        """The first new line matching `pattern`; the timeout only bounds a hang."""
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

    def finish(self, timeout: float = WAIT_SECONDS) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(timeout)  # until end of output
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    @property
    def output(self) -> str:
        return "".join(self.seen)


class ServiceThread:
    """`Service.run` on its own event loop in a thread, as `mailintake serve` runs it."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        settings.http.port = 0  # the admin listener on any free port: 9025 may be taken
        self.service = Service(settings, PipelineContext(settings, sessions))
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="test-serve")

    def start(self) -> ServiceThread:
        self._thread.start()
        assert self._ready.wait(WAIT_SECONDS), "the service never became ready"
        if self.error is not None:
            raise self.error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.service.run(self._stop, on_ready=self._ready.set)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_SECONDS)
        assert not self._thread.is_alive(), "the service never stopped"
        if self.error is not None:
            raise self.error

    def port(self, name: str = "smtp") -> int:
        return self.service.address(name)[1]


def serve_with(
    tmp_path: Path, serve_processes: list[ServeProcess], url: str, **settings: str
) -> tuple[ServeProcess, int]:
    """A `mailintake serve` on database `url` with `settings` (smtp__store_timeout_seconds="1" is
    MAILINTAKE_SMTP__STORE_TIMEOUT_SECONDS), started and listening; it and its SMTP port."""
    child = ServeProcess(
        tmp_path,
        port=0,
        db_url=url,
        env={f"MAILINTAKE_{key.upper()}": value for key, value in settings.items()},
    )
    serve_processes.append(child)
    return child, int(child.wait_for_line(LISTENING).group(1))
