"""SIGKILL of `mailintake serve` while clients send: every message answered `250` is in the
ledger and, after a restart, exactly one ticket (docs/reliability.md, promise 1)."""

from __future__ import annotations

import signal
import smtplib
import threading

import pytest
from sqlalchemy import select

from storage import db
from storage.models import InboundMessage
from storage.states import Fate
from tests.mails import simple_mail
from tests.servers import serve_with, wait_for

pytestmark = pytest.mark.slow

SENDERS = 3
ACKNOWLEDGED_BEFORE_THE_KILL = 20


def keep_sending(port: int, name: str, acknowledged: list[str], lock: threading.Lock) -> None:
    """Send until the connection breaks; record each Message-ID that got `250`."""
    try:
        with smtplib.SMTP("127.0.0.1", port) as client:
            for n in range(10_000):
                message_id = f"<{name}-{n}@example.com>"
                raw = simple_mail(message_id=message_id).replace(b"\n", b"\r\n")
                client.sendmail("customer@example.com", ["inquiry@wine-importer.example.jp"], raw)
                with lock:
                    acknowledged.append(message_id)
    except (OSError, smtplib.SMTPException):
        return  # the server died under us: what was not acknowledged is the sender's


def fates(url: str) -> dict[str, list[str]]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(InboundMessage.message_id, InboundMessage.status)).all()
    finally:
        engine.dispose()
    found: dict[str, list[str]] = {}
    for message_id, status in rows:
        found.setdefault(message_id or "", []).append(status)
    return found


def test_serve_killed_while_clients_send_loses_no_acknowledged_message(
    tmp_path, serve_processes, db_url
):
    child, port = serve_with(tmp_path, serve_processes, db_url)
    acknowledged: list[str] = []
    lock = threading.Lock()
    senders = [
        threading.Thread(target=keep_sending, args=(port, f"s{n}", acknowledged, lock))
        for n in range(SENDERS)
    ]
    for sender in senders:
        sender.start()
    wait_for(lambda: len(acknowledged) >= ACKNOWLEDGED_BEFORE_THE_KILL, "acknowledged mail")
    child.proc.kill()
    for sender in senders:
        sender.join()
    child.finish()

    stored = fates(db_url)
    assert [mid for mid in acknowledged if mid not in stored] == []  # before any restart

    restarted, _port = serve_with(tmp_path, serve_processes, db_url)
    wait_for(
        lambda: all(fates(db_url)[mid] == [Fate.TICKET] for mid in acknowledged),
        "every acknowledged message to be one ticket",
    )
    assert [mid for mid, statuses in fates(db_url).items() if len(statuses) > 1] == []
    restarted.proc.send_signal(signal.SIGTERM)
    assert restarted.finish() == 0, restarted.output
