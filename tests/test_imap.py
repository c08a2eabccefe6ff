"""The IMAP fetcher against a real Dovecot (see tests/dovecot.py): every message exactly once."""

from __future__ import annotations

import itertools
import logging
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from imapclient import IMAPClient
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli import app
from config import ImapAccount, ImapSettings, Settings
from pipeline.process import PipelineContext, process
from sources.imap import (
    CredentialError,
    FolderFetcher,
    Hooks,
    folder_fetchers,
    start_fetchers,
)
from storage import repo
from storage.models import InboundMessage, Ticket
from tests.dovecot import Dovecot, unavailable_reason
from tests.mails import simple_mail
from tests.servers import ServiceThread
from tests.waiting import WAIT_SECONDS, LogCounter, wait_for

USER = "inquiry@wine-importer.example.jp"
PASSWORD = "s3cret-Pa55"  # a test password, never to be seen in logs
FAST = {
    "backoff_initial_seconds": 0.05,
    "backoff_max_seconds": 0.2,
    "poll_interval_seconds": 0.2,
    "timeout_seconds": 60,  # a bound on a hung connection, far above any real answer
}
# An IDLE renewal later than any test waits (tests/waiting.py): what arrives came by a notice.
IDLE_NEVER_RENEWED = 3600


@contextmanager
def started_dovecot(tls: tuple[bytes, bytes] | None = None) -> Iterator[Dovecot]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"Dovecot IMAP tests need Dovecot 2.3: {reason}")
    server = Dovecot(tls)
    try:
        server.add_user(USER, PASSWORD)
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with started_dovecot() as server:
        yield server


@pytest.fixture
def tls_ca() -> trustme.CA:
    """A private CA made for the test, like a company CA or a self-signed server's own."""
    return trustme.CA()


@pytest.fixture
def tls_dovecot(tls_ca: trustme.CA) -> Iterator[Dovecot]:
    """Dovecot with a certificate for 127.0.0.1 from `tls_ca`: TLS on `tls_port`, STARTTLS on
    `port`."""
    cert = tls_ca.issue_cert("127.0.0.1")
    chain = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
    with started_dovecot((chain, cert.private_key_pem.bytes())) as server:
        yield server


def tls_account(dovecot: Dovecot, security: str, ca: trustme.CA, path: Path) -> dict[str, Any]:
    """Account keys to reach `dovecot` with `security`, trusting only `ca` (written to `path`)."""
    ca.cert_pem.write_to_path(str(path))
    port = dovecot.tls_port if security == "tls" else dovecot.port
    return {"security": security, "port": port, "ca_file": str(path)}


class Mailbox:
    """The test user's mailbox as the mail gateway or a human sees it; each call logs in anew,
    so it works across Dovecot restarts."""

    def __init__(self, dovecot: Dovecot) -> None:
        self.port = dovecot.port

    @contextmanager
    def client(self) -> Iterator[IMAPClient]:
        with IMAPClient("127.0.0.1", self.port, ssl=False, timeout=WAIT_SECONDS) as client:
            client.login(USER, PASSWORD)
            yield client

    def fill(self, messages: list[bytes], folder: str = "INBOX") -> None:
        with self.client() as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            for start in range(0, len(messages), 50):
                client.multiappend(folder, messages[start : start + 50])

    def unseen(self, folder: str = "INBOX") -> list[int]:
        with self.client() as client:
            client.select_folder(folder, readonly=True)
            return list(client.search(["UNSEEN"]))

    def count(self, folder: str) -> int | None:
        """Messages in `folder`, None if there is no such folder."""
        with self.client() as client:
            if not client.folder_exists(folder):
                return None
            return int(client.folder_status(folder, ["MESSAGES"])[b"MESSAGES"])

    def uidvalidity(self, folder: str) -> int:
        with self.client() as client:
            return int(client.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"])

    def delete(self, folder: str) -> None:
        with self.client() as client:
            client.delete_folder(folder)


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Mailbox:
    return Mailbox(dovecot)


@pytest.fixture
def tls_mailbox(tls_dovecot: Dovecot) -> Mailbox:
    return Mailbox(tls_dovecot)


def imap_settings(
    db_url: str, dovecot: Dovecot, imap: dict[str, Any] | None = None, **account: Any
) -> Settings:
    if not {"password", "password_env", "token_file", "token_command"} & set(account):
        account["password"] = PASSWORD
    server = {"host": "127.0.0.1", "port": dovecot.port, "security": "none", "username": USER}
    accounts = [{"name": "inquiry", **server, **account}]
    return Settings(database={"url": db_url}, imap={"accounts": accounts, **FAST, **(imap or {})})


def mails(count: int, prefix: str = "在庫の問い合わせ") -> list[bytes]:
    return [
        simple_mail(f"{prefix} {n}", f"ボルドー {n} の在庫はありますか。") for n in range(count)
    ]


def processing(pipeline: PipelineContext) -> Callable[[int], None]:
    def process_one(inbound_id: int) -> None:
        process(pipeline, inbound_id)

    return process_one


def fetcher(
    settings: Settings,
    sessions: sessionmaker[Session],
    pipeline: PipelineContext,
    on_received: Callable[[int], None] | None = None,
) -> FolderFetcher:
    hooks = Hooks(on_received or processing(pipeline))
    (only,) = folder_fetchers(settings, sessions, hooks)
    return only


def ticket_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count(Ticket.id))) or 0


def statuses(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        return repo.count_by_status(session)


def ticketed_message_ids(sessions: sessionmaker[Session]) -> list[str]:
    query = select(InboundMessage.message_id).join(
        Ticket, Ticket.inbound_message_id == InboundMessage.id
    )
    with sessions() as session:
        return list(session.scalars(query))


@pytest.fixture
def running() -> Iterator[Callable[[FolderFetcher], None]]:
    """Run fetchers in threads; stop and join them at the end of the test."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(folder_fetcher: FolderFetcher) -> None:
        thread = threading.Thread(target=folder_fetcher.run, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
        assert not thread.is_alive(), "a fetcher did not stop"


# --- configuration ---------------------------------------------------------------------------


def test_account_needs_exactly_one_credential_and_a_move_target():
    base = {"name": "inquiry", "host": "imap.example.jp", "username": USER}
    with pytest.raises(ValidationError, match="exactly one of"):
        ImapAccount(**base)
    with pytest.raises(ValidationError, match="exactly one of"):
        ImapAccount(**base, password="x", password_env="X")
    with pytest.raises(ValidationError, match="move_to"):
        ImapAccount(**base, password_env="X", after="move")
    account = ImapAccount(**base, token_file="/run/token")
    assert (account.server_port, account.folders, account.after) == (993, ["INBOX"], "seen")
    assert "x" not in repr(ImapAccount(**base, password="x").password)
    with pytest.raises(ValidationError, match="unique: inquiry"):
        ImapSettings(accounts=[{**base, "password_env": "X"}] * 2)


# --- fetching ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("after", ["seen", "move", "delete"])
def test_200_waiting_messages_become_200_tickets_then_the_after_action(
    after, db_url, dovecot, mailbox, sessions, pipeline
):
    mailbox.fill(mails(200))
    settings = imap_settings(db_url, dovecot, after=after, move_to="Processed")
    folder_fetcher = fetcher(settings, sessions, pipeline)

    assert folder_fetcher.fetch_once() == 200

    assert ticket_count(sessions) == 200
    assert statuses(sessions) == {"ticket": 200}
    if after == "seen":
        assert mailbox.unseen() == []
        assert mailbox.count("INBOX") == 200
    else:
        assert mailbox.count("INBOX") == 0
        assert mailbox.count("Processed") == (200 if after == "move" else None)
    with sessions() as session:
        _uidvalidity, last_uid = repo.imap_checkpoint(session, "inquiry", "INBOX")
    assert last_uid == 200
    # The checkpoint keeps a second run from fetching anything again.
    assert folder_fetcher.fetch_once() == 0
    assert statuses(sessions) == {"ticket": 200}


def test_message_appended_while_idling_becomes_a_ticket_without_waiting_for_a_renewal(
    db_url, dovecot, mailbox, sessions, pipeline, running
):
    """Only the server's IDLE notice can bring the appended messages in: the IDLE renewal (the
    fetcher's other reason to look again) is an hour away."""
    mailbox.fill(mails(1, "first"))
    settings = imap_settings(db_url, dovecot, imap={"idle_renew_seconds": IDLE_NEVER_RENEWED})
    running(fetcher(settings, sessions, pipeline))
    wait_for(lambda: ticket_count(sessions) == 1, "the waiting message became a ticket")
    wait_for(lambda: mailbox.unseen() == [], "the first message was marked seen")

    for round_ in (2, 3):
        mailbox.fill(mails(1, f"round {round_}"))
        wait_for(lambda n=round_: ticket_count(sessions) == n, "the appended message")


def test_message_announced_in_a_command_response_is_not_left_for_the_idle_renewal(
    db_url, dovecot, mailbox, sessions, pipeline, running
):
    """Mail arriving during a fetch is announced in the response to our next command (here
    the STORE of \\Seen), not again in IDLE; it must still be fetched right away."""
    mailbox.fill(mails(1, "first"))

    def on_received(inbound_id: int) -> None:
        process(pipeline, inbound_id)
        if inbound_id == 1:
            mailbox.fill(mails(1, "arrived during the fetch"))

    settings = imap_settings(db_url, dovecot, imap={"idle_renew_seconds": IDLE_NEVER_RENEWED})
    running(fetcher(settings, sessions, pipeline, on_received))
    wait_for(lambda: ticket_count(sessions) == 2, "the message that arrived during a fetch")


def test_without_idle_the_fetcher_polls(db_url, dovecot, mailbox, sessions, pipeline, running):
    settings = imap_settings(db_url, dovecot, imap={"idle": False})
    running(fetcher(settings, sessions, pipeline))
    mailbox.fill(mails(3))
    wait_for(lambda: ticket_count(sessions) == 3, "three polled messages became tickets")


@pytest.mark.slow
def test_dovecot_stopped_mid_fetch_and_restarted_every_message_once(
    db_url, dovecot, mailbox, sessions, pipeline, running
):
    messages = mails(200)
    mailbox.fill(messages)
    received = []
    # Dovecot comes back once the fetcher has failed twice: the dropped connection, then a
    # reconnect refused while the server is down.
    failures = LogCounter(lambda record: "reconnecting in" in record.getMessage(), wanted=2)

    def on_received(inbound_id: int) -> None:
        process(pipeline, inbound_id)
        received.append(inbound_id)
        if len(received) == 55:  # in the middle of the sixth batch of ten
            dovecot.stop()

    settings = imap_settings(db_url, dovecot, imap={"batch_size": 10})
    with failures.attached():
        running(fetcher(settings, sessions, pipeline, on_received))
        wait_for(failures.reached.is_set, "two failed attempts while Dovecot is down")
    dovecot.start()
    wait_for(lambda: ticket_count(sessions) == 200, "200 tickets after the restart")
    wait_for(lambda: mailbox.unseen() == [], "every message marked seen")

    ticketed = ticketed_message_ids(sessions)
    assert sorted(ticketed) == sorted(set(ticketed))
    assert len(ticketed) == 200
    assert set(statuses(sessions)) <= {"ticket", "duplicate"}


def test_after_action_failing_after_commit_then_refetch_makes_no_second_ticket(
    db_url, dovecot, mailbox, sessions, pipeline
):
    mailbox.fill(mails(5))

    def on_received(inbound_id: int) -> None:
        process(pipeline, inbound_id)
        if inbound_id == 5:  # committed, not yet marked seen: the connection drops
            dovecot.stop()
            dovecot.start()

    settings = imap_settings(db_url, dovecot)
    with pytest.raises(Exception):  # noqa: B017 - whatever the dropped connection raises
        fetcher(settings, sessions, pipeline, on_received).fetch_once()
    assert ticket_count(sessions) == 5
    assert len(mailbox.unseen()) == 5

    assert fetcher(settings, sessions, pipeline).fetch_once() == 5

    assert ticket_count(sessions) == 5
    assert statuses(sessions) == {"ticket": 5, "duplicate": 5}
    assert mailbox.unseen() == []


def test_uidvalidity_reset_rescans_without_duplicate_tickets(
    db_url, dovecot, mailbox, sessions, pipeline, caplog
):
    messages = mails(5)
    mailbox.fill(messages, "Fax")
    settings = imap_settings(db_url, dovecot, folders=["Fax"])
    assert fetcher(settings, sessions, pipeline).fetch_once() == 5
    before = mailbox.uidvalidity("Fax")

    mailbox.delete("Fax")
    mailbox.fill([*messages, *mails(1, "new after the reset")], "Fax")
    assert mailbox.uidvalidity("Fax") != before

    with caplog.at_level(logging.WARNING, logger="sources.imap"):
        assert fetcher(settings, sessions, pipeline).fetch_once() == 6
    assert "UIDVALIDITY changed" in caplog.text
    assert ticket_count(sessions) == 6
    assert statuses(sessions) == {"ticket": 6, "duplicate": 5}


def test_oversized_message_is_recorded_failed_and_the_rest_flows(
    db_url, dovecot, mailbox, sessions, pipeline
):
    big = simple_mail("FAX 見積書", attachments=[("fax.pdf", "application/pdf", b"%PDF" * 5000)])
    small = mails(3)
    mailbox.fill([small[0], big, *small[1:]])
    settings = imap_settings(db_url, dovecot)
    settings.intake.max_message_bytes = 10_000

    assert fetcher(settings, sessions, pipeline).fetch_once() == 4

    assert statuses(sessions) == {"ticket": 3, "failed": 1}
    with sessions() as session:
        (failed,) = repo.list_messages(session, status="failed")
        assert failed.fail_stage == "fetch"
        assert "over intake.max_message_bytes" in (failed.error or "")
        assert failed.size > 10_000 and failed.message_id
        assert failed.envelope["uid"] == 2
    assert mailbox.unseen() == [2]  # left for a human to see


def make_unreadable(dovecot: Dovecot, subject: str) -> None:
    """Take read permission from the Maildir file of the message with `subject` (Dovecot runs
    as a user that root's permissions do not cover); Dovecot then drops the connection with
    `BYE FETCH failed` when a FETCH needs that message, as it does on disk or cache damage."""
    (path,) = (
        f
        for f in (dovecot.root / "mail" / USER).glob("*/*")
        if f.is_file() and f.parent.name in ("new", "cur") and subject.encode() in f.read_bytes()
    )
    path.chmod(0)


@pytest.mark.parametrize("mode", ["fetch_once", "run"])
def test_message_the_server_cannot_deliver_is_recorded_failed_and_the_rest_flows(
    mode, db_url, dovecot, mailbox, sessions, pipeline, running
):
    mailbox.fill(mails(3, "batch"))
    make_unreadable(dovecot, "batch 1")
    folder_fetcher = fetcher(imap_settings(db_url, dovecot), sessions, pipeline)

    if mode == "fetch_once":
        assert folder_fetcher.fetch_once() == 3
    else:
        running(folder_fetcher)
        wait_for(lambda: sum(statuses(sessions).values()) == 3, "all three messages handled")
        mailbox.fill(mails(1, "after"))  # and the folder is not blocked afterwards
        wait_for(lambda: ticket_count(sessions) == 3, "the message appended afterwards")

    assert statuses(sessions)["ticket"] == (2 if mode == "fetch_once" else 3)
    with sessions() as session:
        (failed,) = repo.list_messages(session, status="failed")
        assert failed.fail_stage == "fetch"
        assert f"127.0.0.1:{dovecot.port} closed the connection" in (failed.error or "")
        assert "FETCH failed" in (failed.error or "")  # Dovecot's own words
        assert failed.envelope["uid"] == 2
    assert mailbox.unseen() == [2]  # left for a human to see


@pytest.mark.parametrize("credential", ["password_env", "token_file", "token_command"])
def test_password_from_env_and_xoauth2_tokens_from_file_or_command(
    credential, db_url, dovecot, mailbox, sessions, pipeline, tmp_path, monkeypatch
):
    # Dovecot checks an XOAUTH2 token like a password against its passdb, so the test user's
    # password doubles as its access token.
    token_file = tmp_path / "token"
    token_file.write_text(f"{PASSWORD}\n", encoding="utf-8")
    monkeypatch.setenv("MAILINTAKE_TEST_IMAP_PASSWORD", PASSWORD)
    source = {
        "password_env": "MAILINTAKE_TEST_IMAP_PASSWORD",
        "token_file": str(token_file),
        "token_command": shlex.join([sys.executable, "-c", f"print({PASSWORD!r})"]),
    }[credential]
    mailbox.fill(mails(2))
    settings = imap_settings(db_url, dovecot, **{credential: source})
    assert fetcher(settings, sessions, pipeline).fetch_once() == 2
    assert ticket_count(sessions) == 2


def test_wrong_password_logs_one_line_per_backoff_and_keeps_trying(
    db_url, dovecot, mailbox, sessions, pipeline, caplog
):
    settings = imap_settings(
        db_url,
        dovecot,
        imap={"backoff_initial_seconds": 0.1, "stalled_after_seconds": 0.3},
        password="wrong-Pa55word",
    )
    stop = threading.Event()

    def mine() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "sources.imap"]

    def is_attempt(record: logging.LogRecord) -> bool:  # the stall report quotes one, too
        return "login as" in record.getMessage() and "reconnecting in" in record.getMessage()

    def attempts_after_the_stall_report() -> int:
        records = mine()
        stalled_at = next((i for i, r in enumerate(records) if "stalled" in r.getMessage()), None)
        if stalled_at is None:
            return 0
        return sum(is_attempt(r) for r in records[stalled_at:])

    with caplog.at_level(logging.DEBUG):
        (thread,) = start_fetchers(settings, sessions, processing(pipeline), stop)
        try:
            wait_for(
                lambda: attempts_after_the_stall_report() >= 2 or not thread.is_alive(),
                "the stall report, then two more login attempts",
            )
            assert thread.is_alive()
        finally:
            stop.set()
            thread.join(timeout=WAIT_SECONDS)
    assert not thread.is_alive()

    attempts = [r for r in mine() if is_attempt(r)]
    assert f"login as {USER} at 127.0.0.1:{dovecot.port} failed" in attempts[0].getMessage()
    assert "AUTHENTICATIONFAILED" in attempts[0].getMessage()
    # No tight loop: each attempt comes at least the shortest backoff (half of 0.1 s) after the
    # one before it (a slow machine only makes the gaps longer).
    gaps = [b.created - a.created for a, b in itertools.pairwise(attempts)]
    assert min(gaps) >= 0.049, gaps  # 1 ms less for the clocks' rounding
    stalled = [r for r in mine() if "stalled" in r.getMessage()]
    assert len(stalled) == 1 and stalled[0].levelno == logging.ERROR
    assert not any("wrong-Pa55word" in r.getMessage() for r in caplog.records)
    assert ticket_count(sessions) == 0


# --- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_and_starttls_verified_against_ca_file_fetch_and_idle(
    security, db_url, tls_dovecot, tls_ca, tls_mailbox, sessions, pipeline, running, tmp_path
):
    tls_mailbox.fill(mails(1, "first"))
    account = tls_account(tls_dovecot, security, tls_ca, tmp_path / "ca.pem")
    running(fetcher(imap_settings(db_url, tls_dovecot, **account), sessions, pipeline))
    wait_for(lambda: ticket_count(sessions) == 1, "the waiting message over TLS")
    # Then a message announced while idling: news must be noticed through the TLS layer too.
    tls_mailbox.fill(mails(1, "while idling"))
    wait_for(lambda: ticket_count(sessions) == 2, "the message appended while idling")
    wait_for(lambda: tls_mailbox.unseen() == [], "both messages marked seen")

    logins = [line for line in tls_dovecot.log().splitlines() if "Login: user=" in line]
    # The test's mailbox helper logs in without TLS: these are the fetcher's logins.
    assert any(", TLS," in line for line in logins)


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_certificate_from_another_ca_is_logged_per_attempt_and_retried(
    security, db_url, tls_dovecot, tls_mailbox, sessions, pipeline, running, tmp_path, caplog
):
    tls_mailbox.fill(mails(1))
    ca_file = tmp_path / "other-ca.pem"
    account = tls_account(tls_dovecot, security, trustme.CA(), ca_file)
    settings = imap_settings(db_url, tls_dovecot, imap={"backoff_initial_seconds": 0.1}, **account)

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "TLS certificate" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="sources.imap"):
        running(fetcher(settings, sessions, pipeline))
        wait_for(lambda: len(attempts()) >= 2, "two failed attempts, with a backoff between")

    first = attempts()[0]
    assert first.levelno == logging.WARNING and first.exc_info is None  # expected, no traceback
    assert first.getMessage().startswith(
        f"imap inquiry/INBOX: TLS certificate of 127.0.0.1:{account['port']} not accepted "
        f"(unable to get local issuer certificate; checked against the ca_file {ca_file}); "
        "reconnecting in "
    )
    assert ticket_count(sessions) == 0
    assert tls_mailbox.unseen() == [1]


def test_unreadable_ca_file_names_the_account_and_the_file(
    db_url, tls_dovecot, sessions, pipeline, tmp_path
):
    missing = tmp_path / "missing-ca.pem"
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("not a certificate\n", encoding="utf-8")
    for ca_file, reason in [(missing, "No such file or directory"), (not_pem, "no certificate")]:
        settings = imap_settings(db_url, tls_dovecot, security="tls", ca_file=str(ca_file))
        with pytest.raises(CredentialError) as caught:
            fetcher(settings, sessions, pipeline).fetch_once()
        message = str(caught.value)
        assert message.startswith(f"account inquiry: cannot load ca_file {ca_file}: ")
        assert reason in message


def test_start_fetchers_runs_one_thread_per_account_folder(
    db_url, dovecot, mailbox, sessions, pipeline
):
    mailbox.fill(mails(2), "Fax")
    mailbox.fill(mails(3))
    settings = imap_settings(db_url, dovecot, folders=["INBOX", "Fax"])
    stop = threading.Event()
    threads = start_fetchers(settings, sessions, processing(pipeline), stop)
    try:
        assert sorted(t.name for t in threads) == ["imap inquiry/Fax", "imap inquiry/INBOX"]
        wait_for(lambda: ticket_count(sessions) == 5, "both folders fetched")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=WAIT_SECONDS)
    assert not any(t.is_alive() for t in threads)


def test_serve_runs_the_fetchers_and_its_worker_makes_the_tickets(
    db_url, dovecot, mailbox, sessions
):
    settings = imap_settings(db_url, dovecot)
    settings.smtp.port = 0
    service = ServiceThread(settings, sessions).start()
    try:
        mailbox.fill(mails(3))
        wait_for(lambda: ticket_count(sessions) == 3, "three tickets from the service")
    finally:
        service.stop()
    assert mailbox.unseen() == []


def test_fetch_once_cli_prints_a_summary_and_exits_1_on_failures(
    db_url, dovecot, mailbox, tmp_path, monkeypatch
):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
database: {{url: "{db_url}"}}
intake: {{max_message_bytes: 10000}}
imap:
  accounts:
    - name: inquiry
      host: 127.0.0.1
      port: {dovecot.port}
      security: none
      username: {USER}
      password_env: MAILINTAKE_TEST_IMAP_PASSWORD
      folders: [INBOX]
""",
        encoding="utf-8",
    )
    monkeypatch.setenv("MAILINTAKE_TEST_IMAP_PASSWORD", PASSWORD)
    runner = CliRunner()
    mailbox.fill(mails(2))
    result = runner.invoke(app, ["--config", str(config), "fetch", "--once", "--json"])
    assert result.exit_code == 0, result.output
    assert '"ticket": 2' in result.stdout

    mailbox.fill([simple_mail("big", attachments=[("a.pdf", "application/pdf", b"x" * 20000)])])
    result = runner.invoke(app, ["--config", str(config), "fetch", "--once"])
    assert result.exit_code == 1
    assert "1 failed" in result.stdout

    result = runner.invoke(app, ["--config", str(config), "fetch", "--once", "--account", "fax"])
    assert result.exit_code == 2
    assert "no IMAP account fax" in result.output


def test_tests_leave_no_dovecot_running(dovecot: Dovecot) -> None:
    group = dovecot.process.pid if dovecot.process else 0
    dovecot.remove()
    assert not Path(dovecot.root).exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_fetch_without_once_runs_until_sigterm(db_url, dovecot, mailbox, sessions, tmp_path):
    """`mailintake fetch` keeps fetching (IDLE) until stopped, as cron-less installs want."""
    import signal
    import subprocess

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
database: {{url: "{db_url}"}}
imap:
  accounts:
    - {{name: inquiry, host: 127.0.0.1, port: {dovecot.port}, security: none,
        username: {USER}, password_env: MAILINTAKE_TEST_IMAP_PASSWORD, folders: [INBOX]}}
""",
        encoding="utf-8",
    )
    mailbox.fill(mails(2))
    env = os.environ | {"MAILINTAKE_TEST_IMAP_PASSWORD": PASSWORD}
    mailintake = str(Path(sys.executable).parent / "mailintake")
    child = subprocess.Popen(
        [mailintake, "--config", str(config), "fetch"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: ticket_count(sessions) == 2, "the waiting mail as tickets", 60)
        mailbox.fill(mails(1, "新着"))
        wait_for(lambda: ticket_count(sessions) == 3, "a new mail seen while running", 60)
        assert child.poll() is None
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
