"""Secrets never reach the logs: not the database password (in `database.url`), not an SMTP
AUTH password (right or wrong), not even while the database fails and errors are logged.

`mailintake -v serve` (debug detail) runs on PostgreSQL (trust authentication: the password in
the URL is sent and ignored) through a relay the test cuts, so connection errors are logged too.
"""

from __future__ import annotations

import base64
import json
import signal
import smtplib

import pytest
from sqlalchemy.engine import make_url

from tests.db_faults import PgGate, wait_for_tickets
from tests.mails import simple_mail
from tests.servers import LISTENING, ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DB_PASSWORD = "Db-Pa55word-4f9e1"
AUTH_PASSWORD = "Auth-Pa55word-7c2d0"
WRONG_PASSWORD = "Wrong-Pa55word-93ab7"


def send(port: int, message_id: str, password: str) -> int:
    """Log in as `faxgw` with `password` and send one mail; the DATA reply code, or the AUTH
    reply code when the login fails."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo()
        try:
            client.login("faxgw", password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        client.mail("fax@example.com")
        client.rcpt("inquiry@wine-importer.example.jp")
        code, _ = client.data(simple_mail(message_id=message_id).replace(b"\n", b"\r\n"))
    return code


def test_no_password_is_logged_whatever_happens(tmp_path, serve_processes, pg_schema_url):
    real = make_url(pg_schema_url)
    gate = PgGate((real.host or "127.0.0.1", real.port or 5432))
    try:
        url = make_url(gate.url(pg_schema_url)).set(password=DB_PASSWORD)
        child = ServeProcess(
            tmp_path,
            port=0,
            db_url=url.render_as_string(hide_password=False),
            env={
                "MAILINTAKE_SMTP__AUTH_USERS": json.dumps({"faxgw": AUTH_PASSWORD}),
                "MAILINTAKE_SMTP__AUTH_REQUIRE_TLS": "false",
                "MAILINTAKE_SMTP__AUTH_FAILURE_DELAY_SECONDS": "0",
                "MAILINTAKE_DATABASE__CONNECT_TIMEOUT_SECONDS": "2",
            },
            options=("-v",),
        )
        serve_processes.append(child)
        port = int(child.wait_for_line(LISTENING).group(1))
        replies = [send(port, "<secret-1@example.com>", AUTH_PASSWORD)]
        wait_for_tickets(pg_schema_url, 1)
        replies.append(send(port, "<secret-2@example.com>", WRONG_PASSWORD))
        gate.freeze(cut=True)
        replies.append(send(port, "<secret-3@example.com>", AUTH_PASSWORD))
        gate.thaw()
        child.proc.send_signal(signal.SIGTERM)
        assert child.finish() == 0, child.output
    finally:
        gate.close()
    assert replies == [250, 535, 451], child.output
    assert "answered 451" in child.output  # the failure was logged, with its error
    for secret in (DB_PASSWORD, AUTH_PASSWORD, WRONG_PASSWORD):
        for form in (secret, base64.b64encode(secret.encode()).decode()):
            assert form not in child.output, f"{form} is in the log:\n{child.output}"
    plain = base64.b64encode(f"\0faxgw\0{AUTH_PASSWORD}".encode()).decode()
    assert plain not in child.output
