"""`mailintake serve` with processing in worker processes (processing.mode: process, 2 workers):
every acknowledged message becomes exactly one ticket, a killed worker is restarted, SIGTERM
leaves no worker behind, and a message that takes forever to process delays no other sender.

The slow message comes from a `sitecustomize` hook put on the child's PYTHONPATH (spawned
workers run it too): parsing a mail with `X-Test-Hold: yes` spins in Python's `re` on a
backtracking pattern, holding the GIL as the issue's hostile mail did, until a file appears.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage import db
from storage.models import InboundMessage, Ticket
from storage.states import Fate
from tests.mails import simple_mail
from tests.servers import LISTENING, ServeProcess, wait_for

RECIPIENT = "inquiry@wine-importer.example.jp"
STARTED = re.compile(r"worker-(\d) started \(pid (\d+)\)")

HOOK = textwrap.dedent(
    """
    import os
    import re
    from pathlib import Path

    import pipeline.stages as stages

    _parse = stages.parse
    RELEASE = Path(os.environ["MAILINTAKE_TEST_RELEASE"])


    def parse(raw):
        if b"X-Test-Hold: yes" in raw:
            while not RELEASE.exists():
                re.match(r"(a|aa)+$", "a" * 24 + "b")  # holds the GIL throughout
        return _parse(raw)


    stages.parse = parse
    """
)


class Serve:
    """A `mailintake serve` child with 2 worker processes and a look into its database."""

    def __init__(self, tmp_path: Path) -> None:
        self.release = tmp_path / "release"
        self.child = ServeProcess(tmp_path, port=0)
        self.port = int(self.child.wait_for_line(LISTENING).group(1))
        self.engine = db.make_engine(self.child.db_url)

    def send(self, *mails: bytes) -> list[int]:
        """Send over one SMTP connection; the ledger ids the 250 replies name."""
        ids = []
        with smtplib.SMTP("127.0.0.1", self.port) as client:
            client.ehlo()
            for mail in mails:
                client.mail("customer@example.com")
                client.rcpt(RECIPIENT)
                code, reply = client.data(mail.replace(b"\n", b"\r\n"))
                assert code == 250, reply
                ids.append(int(reply.rsplit(b" ", 1)[1]))
        return ids

    def statuses(self) -> dict[int, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(InboundMessage.id, InboundMessage.status))
            return {row.id: row.status for row in rows}

    def lease_owner(self, inbound_id: int) -> str | None:
        with self.engine.connect() as conn:
            query = select(InboundMessage.lease_owner).where(InboundMessage.id == inbound_id)
            return conn.scalar(query)

    def tickets(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(Ticket)) or 0

    def all_tickets(self, ids: list[int]) -> bool:
        statuses = self.statuses()
        return all(statuses.get(i) == Fate.TICKET for i in ids)

    def worker_pids(self) -> dict[str, int]:
        return {f"worker-{n}": int(pid) for n, pid in STARTED.findall(self.child.output)}


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), *sys_path()])))
    monkeypatch.setenv("MAILINTAKE_TEST_RELEASE", str(tmp_path / "release"))
    monkeypatch.setenv("MAILINTAKE_PROCESSING__MODE", "process")
    monkeypatch.setenv("MAILINTAKE_PROCESSING__WORKERS", "2")
    started = Serve(tmp_path)
    yield started
    started.engine.dispose()
    child = started.child
    if child.proc.poll() is None:
        child.proc.kill()
    child.proc.wait(30)
    while not child.lines.empty():
        child.seen.append(child.lines.get())
    for pid in started.worker_pids().values():  # never leave a worker behind, even on failure
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child.reader.join(30)  # workers share the stderr pipe: read it to its end before closing
    if child.proc.stderr is not None:
        child.proc.stderr.close()


def sys_path() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def mails(prefix: str, count: int) -> list[bytes]:
    return [simple_mail(message_id=f"<{prefix}-{i}@example.com>") for i in range(count)]


def hold_mail() -> bytes:
    return simple_mail(message_id="<hold@example.com>", headers={"X-Test-Hold": "yes"})


def wait_for_started_workers(serve: Serve, count: int = 2) -> None:
    for _ in range(count):
        serve.child.wait_for_line(STARTED, timeout=120)


def test_two_workers_make_every_ticket_and_sigterm_leaves_no_worker(serve):
    ids = serve.send(*mails("a", 10)) + serve.send(*mails("b", 10))
    wait_for(lambda: serve.all_tickets(ids), "20 tickets", timeout=120)
    assert serve.tickets() == 20
    serve.child.proc.send_signal(signal.SIGTERM)
    assert serve.child.finish() == 0, serve.child.output
    pids = serve.worker_pids()
    assert set(pids) == {"worker-1", "worker-2"}, serve.child.output
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert f"{name} stopped" in serve.child.output


def test_a_killed_worker_is_restarted_and_every_message_is_one_ticket(serve):
    wait_for_started_workers(serve)
    [held] = serve.send(hold_mail())
    before = serve.send(*mails("before", 8))
    wait_for(lambda: serve.lease_owner(held) is not None, "the held message's lease", 120)
    owner = serve.lease_owner(held)
    assert owner is not None
    pid = int(owner.split(":")[1])
    os.kill(pid, signal.SIGKILL)  # midway through the held message
    died = re.compile(rf"worker-\d \(pid {pid}\) died with signal SIGKILL; restarting")
    serve.child.wait_for_line(died)
    serve.child.wait_for_line(STARTED, timeout=120)  # its replacement
    serve.release.touch()
    after = serve.send(*mails("after", 8))
    ids = [held, *before, *after]
    wait_for(lambda: serve.all_tickets(ids), "17 tickets", timeout=120)
    assert serve.tickets() == len(ids)
    serve.child.proc.send_signal(signal.SIGTERM)
    assert serve.child.finish() == 0, serve.child.output


def test_a_message_that_never_finishes_delays_no_other_senders_250(serve):
    wait_for_started_workers(serve)
    [held] = serve.send(hold_mail())
    wait_for(lambda: serve.lease_owner(held) is not None, "the held message's lease", 120)
    [other] = serve.send(simple_mail(message_id="<other@example.com>"))  # 250 while it spins
    assert serve.statuses()[held] == Fate.RECEIVED
    assert serve.lease_owner(held) is not None
    wait_for(lambda: serve.all_tickets([other]), "the other message's ticket", timeout=120)
    # SIGTERM: the spinning worker is killed after the grace period; its message stays
    # `received` (rolled back) for the next start.
    serve.child.proc.send_signal(signal.SIGTERM)
    assert serve.child.finish() == 0, serve.child.output
    assert "did not stop within" in serve.child.output
    assert serve.statuses()[held] == Fate.RECEIVED
    for pid in serve.worker_pids().values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
