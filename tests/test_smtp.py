"""The SMTP/LMTP listener against a real socket on 127.0.0.1, with smtplib as the client."""

from __future__ import annotations

import hashlib
import re
import smtplib
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from config import ConfigError, Settings, load_settings
from sources.service import ListenerError
from storage.models import Attachment, InboundMessage, Ticket
from storage.states import Fate
from tests.conftest import DATA
from tests.db_faults import ledger_locked
from tests.mails import simple_mail
from tests.servers import ServiceThread, wait_for

SENDER = "call-center@denwa-daiko.example.com"
INQUIRY = "inquiry@wine-importer.example.jp"
FAX = "fax@wine-importer.example.jp"


def listener_settings(db_url: str, **smtp: Any) -> dict[str, Any]:
    return {
        "database": {"url": db_url},
        "smtp": {"port": 0, "hostname": "mx.test", "shutdown_grace_seconds": 10} | smtp,
        "lmtp": {"enabled": True, "port": 0},
    }


@pytest.fixture
def serve(db_url: str, sessions: sessionmaker[Session]) -> Iterator[Callable[..., ServiceThread]]:
    """Start a service with extra settings: `serve(smtp={...}, intake={...})`."""
    started: list[ServiceThread] = []

    def start(**overrides: dict[str, Any]) -> ServiceThread:
        base = listener_settings(db_url, **overrides.pop("smtp", {}))
        for section, values in overrides.items():
            base[section] = base.get(section, {}) | values
        running = ServiceThread(Settings(**base), sessions)
        started.append(running)
        return running.start()

    yield start
    for running in started:
        running.stop()


def smtp_client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="gw.denwa-daiko.example.com")
    client.ehlo()
    return client


def send(
    client: smtplib.SMTP, raw: bytes, rcpts: tuple[str, ...] = (INQUIRY,), sender: str = SENDER
) -> tuple[int, str]:
    """One transaction; the reply to DATA (or to the first refused command).

    smtplib sends bytes as they are, so they get the CRLF line ends SMTP needs first.
    """
    for code, reply in (client.mail(sender), *(client.rcpt(r) for r in rcpts)):
        if code != 250:
            client.rset()
            return code, reply.decode()
    code, reply = client.data(crlf(raw))
    return code, reply.decode()


def crlf(raw: bytes) -> bytes:
    """`raw` with the CRLF line ends SMTP carries."""
    crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    return crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n"


def ledger(sessions: sessionmaker[Session]) -> list[InboundMessage]:
    with sessions() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def processed(sessions: sessionmaker[Session], count: int) -> Callable[[], bool]:
    def check() -> bool:
        rows = ledger(sessions)
        return len(rows) >= count and all(r.status != Fate.RECEIVED for r in rows)

    return check


def fax_mail() -> bytes:
    """A FAX gateway mail: a short note and a ~300 KB PDF of the scanned pages."""
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"".join(
        hashlib.sha256(str(i).encode()).digest() for i in range(300 * 1024 // 32)
    )
    return simple_mail(
        subject="FAX受信 03-1234-5678 より 3 枚",
        body="FAXを受信しました。添付のPDFをご確認ください。\n送信元: 03-1234-5678",
        sender="fax-gateway@fax.example.jp",
        to=FAX,
        attachments=[("FAX_20261122_1023.pdf", "application/pdf", pdf + b"\n%%EOF\n")],
    )


def test_three_kinds_of_mail_are_acknowledged_after_storing_and_become_tickets(serve, sessions):
    service = serve()
    mails = {
        "phone": (DATA / "answering-service-iso2022jp.eml").read_bytes(),
        "fax": fax_mail(),
        "webform": (DATA / "smtp-webform-html.eml").read_bytes(),
    }
    client = smtp_client(service.port())
    try:
        replies = {kind: send(client, raw) for kind, raw in mails.items()}
    finally:
        client.quit()
    rows = ledger(sessions)
    for (kind, (code, reply)), row in zip(replies.items(), rows, strict=True):
        assert (code, reply) == (250, f"2.0.0 Ok: stored as {row.id}"), kind
        assert bytes(row.raw) == crlf(mails[kind]), f"{kind}: stored bytes differ from sent"
        assert (row.source, row.mail_from, row.rcpt_to, row.peer) == (
            "smtp",
            SENDER,
            [INQUIRY],
            "127.0.0.1",
        )
        assert row.envelope["helo"] == "gw.denwa-daiko.example.com"
        assert row.envelope["tls"] is None
        assert row.envelope["received"].startswith(
            "from gw.denwa-daiko.example.com ([127.0.0.1]) by mx.test (mailintake) with ESMTP;"
        )
    wait_for(processed(sessions, 3), "three processed messages")
    with sessions() as session:
        tickets = {t.inbound_message_id: t for t in session.scalars(select(Ticket))}
        pdfs = session.scalars(select(Attachment).where(Attachment.ticket_id.is_not(None))).all()
    assert [r.status for r in ledger(sessions)] == [Fate.TICKET] * 3
    phone, fax, webform = (tickets[r.id] for r in rows)
    assert phone.subject == "【電話受付】①㈱髙島屋ワイン様よりお問い合わせ"
    assert fax.subject == "FAX受信 03-1234-5678 より 3 枚"
    assert [(a.filename, a.ticket_id) for a in pdfs] == [("FAX_20261122_1023.pdf", fax.id)]
    assert pdfs[0].size > 300_000
    assert webform.subject == "【お問い合わせフォーム】法人ご購入のご相談"
    assert "ブルゴーニュの赤を月に2ケース" in webform.body


def test_recipient_outside_the_accepted_ones_gets_550_and_leaves_no_row(serve, sessions):
    service = serve(smtp={"accept_addresses": ["fax@gw.example.jp"]})
    client = smtp_client(service.port())
    try:
        client.mail(SENDER)
        refused = client.rcpt("someone@elsewhere.example.com")
        accepted_address = client.rcpt("FAX@gw.example.jp")
        client.rset()
        code, _ = send(client, simple_mail(), rcpts=("sales@wine-importer.example.jp.evil",))
    finally:
        client.quit()
    assert refused[0] == 550 and refused[1].startswith(b"5.1.1 <someone@elsewhere.example.com>")
    assert accepted_address[0] == 250
    assert code == 550
    assert ledger(sessions) == []


def test_recipients_over_the_limit_get_452_and_the_rest_is_stored(serve, sessions):
    service = serve(smtp={"max_recipients": 2})
    rcpts = (INQUIRY, FAX, "sales@wine-importer.example.jp")
    client = smtp_client(service.port())
    try:
        client.mail(SENDER)
        codes = [client.rcpt(r)[0] for r in rcpts]
        code, _ = client.data(crlf(simple_mail()))
    finally:
        client.quit()
    assert (codes, code) == ([250, 250, 452], 250)
    assert [row.rcpt_to for row in ledger(sessions)] == [[INQUIRY, FAX]]


def test_inconsistent_listener_settings_are_reported_with_their_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("smtp:\n  port: 2525\n  require_tls: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config.yaml:1:1: smtp: require_tls needs tls_cert"):
        load_settings(path)


def test_message_over_the_size_limit_gets_552_and_leaves_no_row(serve, sessions):
    service = serve(intake={"max_message_bytes": 20_000})
    big = simple_mail(body="ワイン" * 10_000)
    client = smtp_client(service.port())
    try:
        announced = client.esmtp_features["size"]
        declared = client.mail(SENDER, options=[f"SIZE={len(big)}"])
        client.rset()
        undeclared = send(client, big)
        small = send(client, simple_mail())
    finally:
        client.quit()
    assert announced == "20000"
    assert declared == (552, b"5.3.4 Message too big: the limit is 20000 bytes")
    assert undeclared == (552, "5.3.4 Message too big: the limit is 20000 bytes")
    assert small[0] == 250
    assert [len(row.raw) < 20_000 for row in ledger(sessions)] == [True]


def rename_ledger(engine: Engine, old: str, new: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))


def test_database_unavailable_gets_451_and_the_same_client_retry_succeeds(serve, sessions, engine):
    service = serve()
    raw = simple_mail(message_id="<retry-1@denwa-daiko.example.com>")
    client = smtp_client(service.port())
    try:
        rename_ledger(engine, "inbound_ledger", "inbound_ledger_away")
        try:
            while_down = send(client, raw)
            with engine.connect() as conn:
                recorded = conn.scalar(text("SELECT count(*) FROM inbound_ledger_away"))
        finally:
            rename_ledger(engine, "inbound_ledger_away", "inbound_ledger")
        after = send(client, raw)
    finally:
        client.quit()
    assert while_down == (451, "4.3.0 Cannot store the message now, try again later")
    assert recorded == 0
    rows = ledger(sessions)
    assert after == (250, f"2.0.0 Ok: stored as {rows[0].id}")
    assert [r.message_id for r in rows] == ["<retry-1@denwa-daiko.example.com>"]


def test_lmtp_answers_once_per_recipient(serve, sessions):
    service = serve()
    client = smtplib.LMTP("127.0.0.1", service.port("lmtp"), local_hostname="mta.example.jp")
    try:
        client.ehlo()
        client.mail(SENDER)
        rcpt_replies = [client.rcpt(r) for r in (INQUIRY, "nobody@elsewhere.example.com", FAX)]
        first = client.data(crlf(simple_mail()))
        second = client.getreply()
    finally:
        client.quit()
    (row,) = ledger(sessions)
    assert [code for code, _ in rcpt_replies] == [250, 550, 250]
    assert [first, second] == [
        (250, f"2.0.0 <{INQUIRY}> Ok: stored as {row.id}".encode()),
        (250, f"2.0.0 <{FAX}> Ok: stored as {row.id}".encode()),
    ]
    assert (row.source, row.rcpt_to) == ("lmtp", [INQUIRY, FAX])
    assert " with LMTP;" in row.envelope["received"]


def test_lmtp_refuses_an_over_size_message_once_per_recipient(serve, sessions):
    service = serve(intake={"max_message_bytes": 5_000})
    client = smtplib.LMTP("127.0.0.1", service.port("lmtp"))
    try:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt(INQUIRY)
        client.rcpt(FAX)
        replies = [client.data(crlf(simple_mail(body="x" * 10_000))), client.getreply()]
        after = client.noop()
    finally:
        client.quit()
    assert [code for code, _ in replies] == [552, 552]
    assert after[0] == 250  # the replies are in step with the commands
    assert ledger(sessions) == []


def test_connection_limit_and_network_allow_list_refuse_at_connect(serve):
    limited = serve(smtp={"max_connections": 1})
    first = smtp_client(limited.port())
    try:
        with pytest.raises(smtplib.SMTPConnectError) as busy:
            smtplib.SMTP("127.0.0.1", limited.port())
    finally:
        first.quit()
    fenced = serve(smtp={"allow_networks": ["192.0.2.0/24"]})
    with pytest.raises(smtplib.SMTPConnectError) as denied:
        smtplib.SMTP("127.0.0.1", fenced.port())
    assert busy.value.smtp_code == 421
    assert denied.value.smtp_code == 554


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=mx.test", "-keyout", str(key), "-out", str(cert)]
    try:
        subprocess.run(command, check=True, capture_output=True)
    except FileNotFoundError:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    return cert, key


def test_starttls_and_auth_are_recorded_in_the_envelope(serve, sessions, certificate):
    cert, key = certificate
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    service = serve(
        smtp=tls
        | {
            "auth_users": {"faxgw": "s3cret"},
            "auth_required": True,
            "auth_failure_delay_seconds": 0,
        }
    )
    client = smtp_client(service.port())
    try:
        plain_auth_offered = "auth" in client.esmtp_features
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo()
        before_login = client.mail(SENDER)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("faxgw", "wrong")
        client.login("faxgw", "s3cret")
        code, _ = send(client, fax_mail(), rcpts=(FAX,))
    finally:
        client.quit()
    assert not plain_auth_offered  # AUTH only after STARTTLS
    assert before_login[0] == 530
    assert code == 250
    (row,) = ledger(sessions)
    assert row.envelope["auth_user"] == "faxgw"
    assert row.envelope["tls"]["version"].startswith("TLS")
    assert " with ESMTPSA;" in row.envelope["received"]


def test_shutdown_while_clients_are_sending_loses_no_acknowledged_message(serve, sessions):
    service = serve()
    port = service.port()
    acknowledged: list[str] = []
    lock = threading.Lock()

    def keep_sending() -> None:
        try:
            client = smtp_client(port)
        except (OSError, smtplib.SMTPException):
            return
        try:
            while True:
                message_id = make_msgid(domain="load.example.com")
                code, _ = send(client, simple_mail(message_id=message_id))
                if code != 250:
                    return
                with lock:
                    acknowledged.append(message_id)
        except (OSError, smtplib.SMTPException):
            return  # the service said goodbye (421) or closed the connection
        finally:
            client.close()

    senders = [threading.Thread(target=keep_sending) for _ in range(6)]
    for thread in senders:
        thread.start()
    wait_for(lambda: len(acknowledged) >= 30, "30 acknowledged messages")
    service.stop()
    for thread in senders:
        thread.join(30)
    stored = {row.message_id for row in ledger(sessions)}
    assert acknowledged
    assert set(acknowledged) <= stored
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", port)


def test_a_second_service_on_a_taken_port_fails_with_a_clear_message(serve, db_url, sessions):
    first = serve()
    settings = Settings(**listener_settings(db_url, port=first.port()))
    second = ServiceThread(settings, sessions)
    with pytest.raises(ListenerError, match=rf"cannot listen for SMTP on 127.0.0.1:{first.port()}"):
        second.start()


def test_sessions_waiting_together_share_one_ledger_commit(serve, db_url):
    """Group commit over real sockets: while the ledger is locked, three sessions' messages wait;
    once it is free they are committed in fewer than three commits, and each gets its 250."""
    listener = serve()
    handler = listener.service.handler
    assert handler is not None
    mails = [simple_mail(subject=f"同時 {n}") for n in range(3)]

    def deliver(raw: bytes) -> tuple[int, str]:
        with smtp_client(listener.port()) as client:
            return send(client, raw)

    with ThreadPoolExecutor(3) as pool:
        with ledger_locked(db_url):
            replies = [pool.submit(deliver, raw) for raw in mails]
            wait_for(lambda: handler.stores_in_flight == 3, "three messages waiting to commit")
        codes = [reply.result()[0] for reply in replies]
    assert codes == [250, 250, 250]
    registry = listener.service.metrics.registry
    commits = registry.get_sample_value("mailintake_ledger_commit_messages_count")
    assert registry.get_sample_value("mailintake_ledger_commit_messages_sum") == 3
    assert commits is not None and commits < 3
