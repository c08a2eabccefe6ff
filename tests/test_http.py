"""The admin HTTP listener of `mailintake serve`: /metrics moves when mail arrives, /readyz turns
503 with the reason when the database is unreachable or an IMAP fetcher stalls, and back.

Every wait polls the endpoint until it says what is expected, bounded by a generous deadline."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import smtplib
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text, update

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext
from sources.http import Readiness
from sources.metrics import Parts
from sources.service import ListenerError, Service
from storage import db
from storage.models import InboundMessage, utcnow
from tests.conftest import PG_URL, own_pg_database, pg_database_url
from tests.mails import simple_mail
from tests.servers import LISTENING, ServeProcess, ServiceThread, wait_for
from tests.test_imap import imap_settings, started_dovecot

HTTP_LISTENING = re.compile(r"listening for HTTP on 127\.0\.0\.1:(\d+)")
RECIPIENT = "inquiry@wine-importer.example.jp"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def ready(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(port, "/readyz")
    return status, json.loads(body)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(port: int, name: str, **labels: str) -> float | None:
    return scrape(port).get((name, tuple(sorted(labels.items()))))


def send(port: int, message_id: str) -> None:
    mail = simple_mail(message_id=message_id).replace(b"\n", b"\r\n")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("customer@example.com", [RECIPIENT], mail)


def test_metrics_of_a_running_serve_move_when_mail_arrives(tmp_path, serve_processes):
    child = ServeProcess(tmp_path, port=0)  # processing in a worker process
    serve_processes.append(child)
    smtp_port = int(child.wait_for_line(LISTENING).group(1))
    http = int(child.wait_for_line(HTTP_LISTENING).group(1))
    assert get(http, "/healthz") == (200, '{"alive":true}')
    assert ready(http) == (200, {"ready": True, "reasons": [], "checks": checks(0)})
    before = scrape(http)
    assert ("mailintake_messages_received_total", (("source", "smtp"),)) not in before
    assert before[("mailintake_backlog_messages", ())] == 0

    send(smtp_port, "<metrics-1@example.com>")
    wait_for(
        lambda: value(http, "mailintake_messages", status="ticket") == 1, "a ticket in /metrics"
    )
    after = scrape(http)
    assert after[("mailintake_messages_received_total", (("source", "smtp"),))] == 1
    assert after[("mailintake_smtp_replies_total", (("code", "250"),))] >= 3  # EHLO, MAIL, DATA
    assert after[("mailintake_smtp_data_reply_seconds_count", (("code", "250"),))] == 1
    assert after[("mailintake_ledger_commit_messages_count", ())] == 1  # one group commit
    assert after[("mailintake_ledger_commit_messages_sum", ())] == 1  # of one message
    assert after[("mailintake_ledger_commit_seconds_count", ())] == 1
    assert after[("mailintake_backlog_messages", ())] == 0
    assert after[("mailintake_failed_messages", ())] == 0
    assert after[("mailintake_database_up", ())] == 1
    # Measured in the worker process, merged by the listener process at scrape time.
    wait_for(lambda: value(http, "mailintake_processing_seconds_count") == 1, "processing time")
    assert ready(http)[0] == 200

    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output


def checks(backlog: int) -> dict[str, Any]:
    return {"database": "ok", "processing": {"backlog": backlog, "oldest_age_seconds": 0.0}}


@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of its own, migrated, that the test may take away (rename)."""
    with own_pg_database("mi_http") as name:
        yield name


def rename_database(old: str, new: str) -> None:
    """Cut the database's connections and rename it: to the service it is gone."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                {"d": old},
            )
            conn.execute(text(f"ALTER DATABASE {old} RENAME TO {new}"))
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_readyz_says_503_while_the_database_is_unreachable_and_200_after(own_database):
    url = pg_database_url(own_database)
    settings = Settings(database={"url": url}, smtp={"port": 0}, processing={"mode": "thread"})
    engine = db.make_engine(url)
    service = ServiceThread(settings, db.make_session_factory(engine)).start()
    try:
        http = service.port("http")
        assert ready(http)[0] == 200, ready(http)
        rename_database(own_database, f"{own_database}_away")
        wait_for(lambda: ready(http)[0] == 503, "/readyz to say 503")
        _status, body = ready(http)
        assert body["ready"] is False
        assert len(body["reasons"]) == 1
        assert body["reasons"][0].startswith("database unreachable: OperationalError: ")
        assert own_database in body["reasons"][0]  # PostgreSQL names the missing database
        assert value(http, "mailintake_database_up") == 0
        assert get(http, "/healthz")[0] == 200  # alive all the same

        rename_database(f"{own_database}_away", own_database)
        wait_for(lambda: ready(http)[0] == 200, "/readyz to say 200 again")
        assert value(http, "mailintake_database_up") == 1
    finally:
        service.stop()
        engine.dispose()


def test_a_stalled_imap_fetcher_shows_in_readyz_and_in_its_metrics(db_url, sessions):
    with started_dovecot() as dovecot:
        settings = imap_settings(db_url, dovecot, {"stalled_after_seconds": 1})
        settings.smtp.port = 0
        settings.processing.mode = "thread"
        service = ServiceThread(settings, sessions).start()
        try:
            http = service.port("http")
            where = {"account": "inquiry", "folder": "INBOX"}
            wait_for(lambda: ready(http)[1]["checks"]["imap"] == {"inquiry/INBOX": "ok"}, "a sync")
            assert ready(http)[0] == 200
            assert value(http, "mailintake_imap_fetcher_state", **where, state="ok") == 1
            assert value(http, "mailintake_imap_stalled", **where) == 0

            dovecot.stop()
            wait_for(lambda: ready(http)[0] == 503, "/readyz to report the stall")
            reasons = ready(http)[1]["reasons"]
            assert len(reasons) == 1
            assert reasons[0].startswith("imap inquiry/INBOX stalled: no successful fetch for ")
            assert value(http, "mailintake_imap_stalled", **where) == 1
            assert value(http, "mailintake_imap_fetcher_state", **where, state="failing") == 1
            assert (value(http, "mailintake_imap_seconds_since_success", **where) or 0) >= 1

            dovecot.start()
            wait_for(lambda: ready(http)[1]["checks"]["imap"] == {"inquiry/INBOX": "ok"}, "a sync")
            assert ready(http)[0] == 200
            assert value(http, "mailintake_imap_stalled", **where) == 0
        finally:
            service.stop()


def test_readyz_reports_a_backlog_older_than_processing_stall_after(settings, sessions):
    settings.processing.stall_after_seconds = 60
    readiness = Readiness(settings, sessions, Parts())
    assert readiness.check()["ready"] is True
    inbound_id = receive(sessions, simple_mail(), Envelope(source="smtp"))
    assert readiness.check()["ready"] is True  # received just now: not stalled
    with sessions.begin() as session:
        old = utcnow() - timedelta(seconds=120)
        session.execute(
            update(InboundMessage).where(InboundMessage.id == inbound_id).values(received_at=old)
        )
    result = readiness.check()
    assert result["ready"] is False
    assert result["reasons"] == [
        "processing stalled: the oldest of 1 unprocessed messages has waited 120 s "
        "(processing.stall_after_seconds is 60)"
    ]


def test_http_enabled_false_starts_no_listener(settings, sessions):
    settings.http.enabled = False
    settings.smtp.port = 0
    service = ServiceThread(settings, sessions).start()
    try:
        assert service.service.http is None
    finally:
        service.stop()


def test_a_taken_http_port_stops_the_service_saying_so(settings, sessions):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings.smtp.port = 0
        settings.http.port = port
        service = Service(settings, PipelineContext(settings, sessions))
        with pytest.raises(ListenerError) as raised:
            asyncio.run(service.run(asyncio.Event()))
    assert f"cannot listen for HTTP on 127.0.0.1:{port}: Address already in use" in str(
        raised.value
    )
