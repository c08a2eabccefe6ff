"""`mailintake serve` as a process: it listens, stores, and stops on SIGTERM with exit code 0."""

from __future__ import annotations

import re
import signal
import smtplib
import socket

from sqlalchemy import select

from storage import db
from storage.models import InboundMessage
from storage.states import Fate
from tests.mails import simple_mail
from tests.servers import LISTENING, ServeProcess


def test_serve_stores_a_message_and_exits_0_on_sigterm(tmp_path, serve_processes):
    child = ServeProcess(tmp_path, port=0)
    serve_processes.append(child)
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
    assert status == Fate.TICKET


def test_serve_on_a_taken_port_exits_2_saying_so(tmp_path, serve_processes):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        child = ServeProcess(tmp_path, port=port)
        serve_processes.append(child)
        code = child.finish()
    assert code == 2, child.output
    expected = f"error: cannot listen for SMTP on 127.0.0.1:{port}: Address already in use"
    assert expected in " ".join(child.output.split())
