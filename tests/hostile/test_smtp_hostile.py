"""The SMTP/LMTP listener against clients that misbehave, on real sockets with real clients.

Most tests run the listener itself (`IntakeSMTP`/`IntakeLMTP`, `IntakeHandler`, `Door`) on its
own event loop in a thread, with a store the test chooses (one that keeps messages in a list,
or one that never returns); those that need the ledger run the whole service. Servers listen
on 127.0.0.1; per-client tests connect from 127.0.0.2, 127.0.0.3 and 127.0.0.4. Nothing sleeps
for a fixed time: tests wait for replies, or for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import itertools
import logging
import random
import re
import select
import smtplib
import socket
import ssl
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session, sessionmaker

from config import Settings, SmtpSettings
from ingest.mail import Envelope
from sources import smtp
from sources.smtp import Door, IntakeHandler, IntakeLMTP, IntakeSMTP, protocol_factory, tls_context
from storage.models import InboundMessage
from tests.mails import simple_mail
from tests.servers import ServiceThread, wait_for

T = TypeVar("T")

SENDER = "fax-gateway@fax.example.jp"
INQUIRY = "inquiry@wine-importer.example.jp"
FAX = "fax@wine-importer.example.jp"
CLIENT_TIMEOUT = 20  # a socket timeout so that a test fails rather than hangs


# --- the listener on its own loop, and clients ------------------------------------------------


class Listener:
    """Our listener on its own event loop in a thread, with a store the test chooses."""

    def __init__(
        self,
        store: smtp.Store | None = None,
        *,
        protocol: type[IntakeSMTP] = IntakeSMTP,
        handler_class: type[IntakeHandler] = IntakeHandler,
        max_bytes: int = 1_000_000,
        **smtp_settings: Any,
    ) -> None:
        # Per-client limits apply to loopback here (by default loopback is exempt).
        base: dict[str, Any] = {"hostname": "mx.test", "client_limit_exceptions": []}
        self.settings = SmtpSettings(**(base | smtp_settings))
        self.stored: list[tuple[bytes, Envelope]] = []
        self._store = store or self.keep
        self._protocol = protocol
        self._handler_class = handler_class
        self._max_bytes = max_bytes
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-listener")
        self.port = 0

    async def keep(self, raw: bytes, envelope: Envelope) -> int:
        self.stored.append((raw, envelope))
        return len(self.stored)

    def start(self) -> Listener:
        self._thread.start()
        assert self._ready.wait(30), "the listener did not start"
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.handler = self._handler_class(
            self.settings, self._store, max_bytes=self._max_bytes, hostname="mx.test"
        )
        self.door = Door(self.settings)
        context = tls_context(self.settings)
        factory = protocol_factory(self._protocol, self.handler, self.door, self.settings, context)
        server = await self.loop.create_server(factory, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            self.door.send_all_away()
            await server.wait_closed()
            await asyncio.sleep(0)  # the transports run their connection_lost

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the listener's loop (where its state lives) and return its result."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function())
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return result.result(timeout=30)

    def protocols(self) -> list[IntakeSMTP]:
        return self.call(lambda: list(self.door.inside))

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the listener did not stop"


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(*args: Any, **kwargs: Any) -> Listener:
        listener = Listener(*args, **kwargs)
        started.append(listener)
        return listener.start()

    yield start
    for listener in started:
        listener.stop()


def client(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    """smtplib, connected from `source` and greeted with EHLO."""
    connection = smtplib.SMTP(
        "127.0.0.1",
        port,
        local_hostname="gw.example.jp",
        source_address=(source, 0),
        timeout=CLIENT_TIMEOUT,
    )
    connection.ehlo()
    return connection


class Raw:
    """A client that writes exactly the bytes it is given and reads replies line by line."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        """The next reply: (code, text), the lines of a multi-line reply joined by newlines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("the server closed the connection")
            lines.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(text[4:] for text in lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> tuple[int, str]:
        self.send(line + b"\r\n")
        return self.reply()

    def transaction(self, rcpt: str = INQUIRY) -> None:
        """MAIL and RCPT and DATA, up to the 354."""
        assert self.command(f"MAIL FROM:<{SENDER}>".encode())[0] == 250
        assert self.command(f"RCPT TO:<{rcpt}>".encode())[0] == 250
        assert self.command(b"DATA")[0] == 354

    def closed_by_server(self) -> bool:
        """True once the server has closed: waits (up to the socket timeout) for that."""
        return self.file.read(1) == b""

    def has_data(self) -> bool:
        """Whether the server has sent anything not read yet, without waiting."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def crlf(raw: bytes) -> bytes:
    crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    return crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n"


def wire(content: bytes) -> bytes:
    """What a client sends after the 354 for `content` (empty, or ending with CRLF)."""
    return re.sub(rb"(?:^|(?<=\r\n))\.", b"..", content) + b".\r\n"


# --- 1. memory: the excess over the size limit is discarded as it arrives ------------------


def test_an_endless_line_is_discarded_as_it_arrives_and_memory_stays_bounded(listen):
    limit = 64 * 1024
    listener = listen(max_bytes=limit)
    sender = Raw(listener.port)
    piece = b"x" * (64 * 1024)
    sent = 16 * 1024 * 1024  # one line without CRLF, 256 times the size limit
    try:
        sender.command(b"EHLO gw.example.jp")
        sender.transaction()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(sent // len(piece)):
                sender.send(piece)
            sender.send(b"\r\n.\r\n")
            refused = sender.reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Python's allocations in this process (listener and client) while 16 MiB went through:
        # the size limit plus a constant (reader buffer, socket reads), nowhere near 16 MiB.
        assert peak - before < limit + 1024 * 1024, f"{peak - before} bytes allocated"
        held = max(p.peak_held_bytes for p in listener.protocols())
        after = sender.command(b"NOOP")
    finally:
        sender.close()
    assert refused == (552, f"5.3.4 Message too big: the limit is {limit} bytes")
    assert held <= limit  # the listener's own accounting of message bytes it held
    assert after[0] == 250  # client and server are still in step
    assert listener.stored == []


# --- 2. long lines and bare LF are accepted; dot-unstuffing and the end of data -----------


@pytest.fixture
def service(db_url: str, sessions: sessionmaker[Session]) -> Iterator[ServiceThread]:
    settings = Settings(
        database={"url": db_url},
        smtp={"port": 0, "hostname": "mx.test", "shutdown_grace_seconds": 10},
    )
    running = ServiceThread(settings, sessions).start()
    yield running
    running.stop()


def webform_mail_with_a_long_line() -> bytes:
    """A web-form notification whose HTML body is one line of 200,000 characters and more."""
    rows = "".join(f"<tr><td>項目{i}</td><td>ブルゴーニュ 2ケース</td></tr>" for i in range(6000))
    head = (
        f"From: form@wine-importer.example.jp\nTo: {INQUIRY}\n"
        "Subject: =?UTF-8?B?44GK5ZWP44GE5ZCI44KP44Gb?=\nMessage-ID: <long-line@form.example.jp>\n"
        "MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    )
    return (head + f"<html><body><table>{rows}</table></body></html>\n").encode()


def test_long_lines_and_bare_lf_mail_are_accepted_and_stored_exactly(service, sessions):
    long_line = webform_mail_with_a_long_line()
    assert max(len(line) for line in long_line.split(b"\n")) > 200_000
    bare_lf = simple_mail(body="FAXを受信しました。\n" * 200, message_id="<bare-lf@fax.example.jp>")
    assert len(bare_lf) > 1000 and b"\r\n" not in bare_lf  # as email.as_bytes() writes it
    with client(service.port()) as sender:
        sender.mail(SENDER)
        sender.rcpt(INQUIRY)
        long_reply = sender.data(crlf(long_line))
    raw = Raw(service.port())
    try:
        raw.command(b"EHLO fax.example.jp")
        raw.transaction()
        raw.send(bare_lf + b"\r\n.\r\n")  # the bytes as they are, then the end of data
        lf_reply = raw.reply()
    finally:
        raw.close()
    with sessions() as session:
        rows = {r.message_id: bytes(r.raw) for r in session.scalars(sql_select(InboundMessage))}
    assert long_reply[0] == 250, long_reply
    assert lf_reply[0] == 250, lf_reply
    assert rows["<long-line@form.example.jp>"] == crlf(long_line)
    assert rows["<bare-lf@fax.example.jp>"] == bare_lf + b"\r\n"


def random_contents(count: int) -> Iterator[bytes]:
    """Messages made of ".", CR, LF and "x": stuffed lines, lone dots, bare CR and LF."""
    rng = random.Random(5321)
    yield b""
    yield b".\r\n"
    yield b"\r\n.\r\n..\r\n"
    for _ in range(count):
        body = bytes(rng.choice(b".\r\nx") for _ in range(rng.randrange(0, 24)))
        yield body + b"\r\n"


def test_dot_unstuffing_and_the_end_of_data_are_right_at_every_read_boundary():
    """`read_message` on a reader with a tiny limit, fed one byte at a time and all at once."""

    async def read(content: bytes, pieces: list[bytes], limit: int) -> tuple[bytes | None, bytes]:
        reader = asyncio.StreamReader(limit=limit)
        reading = asyncio.ensure_future(smtp.read_message(reader, 1_000))
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)  # the reader reads what it has
        reader.feed_eof()
        return await reading, await reader.read()

    async def check_all() -> None:
        for content in random_contents(400):
            sent = wire(content) + b"NOOP\r\n"  # a pipelined command after the end of data
            for limit in (3, 4, 7):
                for pieces in ([sent], [sent[i : i + 1] for i in range(len(sent))]):
                    message, rest = await read(content, pieces, limit)
                    assert (message, rest) == (content, b"NOOP\r\n"), (sent, limit, len(pieces))

    asyncio.run(check_all())


def test_over_the_limit_is_refused_with_the_rest_read_to_the_end_of_data():
    async def read() -> tuple[bytes | None, bytes]:
        reader = asyncio.StreamReader(limit=8)
        reader.feed_data(wire(b"..x" * 100 + b"\r\n") + b"RSET\r\n")
        reader.feed_eof()
        return await smtp.read_message(reader, 100), await reader.read()

    assert asyncio.run(read()) == (None, b"RSET\r\n")


def test_dot_stuffed_mail_in_one_byte_writes_is_stored_unstuffed(listen):
    listener = listen()
    content = (
        b".first line starts with a dot\r\n"
        b"..\r\n"  # a line that is a single dot
        b"end of a sentence.\r\n"
        b".\r.\n..\r\n"  # CR and LF alone are content
        b"\r\n"
    )
    raw = Raw(listener.port)
    try:
        raw.command(b"EHLO gw.example.jp")
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = []
        for pieces in ([wire(content)], [bytes([b]) for b in wire(content)]):
            raw.transaction()
            for piece in pieces:
                raw.send(piece)
            replies.append(raw.reply()[0])
        raw.transaction()
        raw.send(wire(content) + b"NOOP\r\n")  # pipelined: the NOOP is a command, not data
        replies += [raw.reply()[0], raw.reply()[0]]
    finally:
        raw.close()
    assert replies == [250, 250, 250, 250]
    assert [message for message, _ in listener.stored] == [content] * 3


# --- 3. one client cannot take the slots or the CPU ---------------------------------------


def test_one_address_at_its_connection_limit_does_not_shut_out_another(listen):
    listener = listen(max_connections=4, max_connections_per_client=2)
    held = [client(listener.port, "127.0.0.2") for _ in range(2)]
    try:
        with pytest.raises(smtplib.SMTPConnectError) as third:
            client(listener.port, "127.0.0.2")
        with client(listener.port, "127.0.0.3") as other:
            served = other.noop()
        held.pop().quit()
        wait_for(lambda: len(listener.protocols()) == 1, "the connection that quit to be gone")
        with client(listener.port, "127.0.0.2") as again:
            served_again = again.noop()
    finally:
        for connection in held:
            connection.quit()
    assert third.value.smtp_code == 421
    assert (
        third.value.smtp_error == b"4.7.0 Too many connections from your address, try again later"
    )
    assert served[0] == served_again[0] == 250


def test_connection_rate_per_address_is_limited_and_refilled_over_time(listen):
    listener = listen(max_connections_per_client_per_minute=3)
    now = [1000.0]
    listener.call(lambda: setattr(listener.door, "clock", lambda: now[0]))

    def connect_from(source: str) -> int:
        try:
            client(listener.port, source).quit()
        except smtplib.SMTPConnectError as exc:
            return exc.smtp_code
        return 250

    burst = [connect_from("127.0.0.2") for _ in range(4)]
    other = connect_from("127.0.0.3")
    now[0] += 20  # 3 a minute: one more connection after 20 s
    refilled = [connect_from("127.0.0.2") for _ in range(2)]
    assert burst == [250, 250, 250, 421]
    assert other == 250
    assert refilled == [250, 421]


def test_loopback_is_exempt_from_per_client_limits_by_default(listen):
    listener = listen(
        max_connections_per_client=1, client_limit_exceptions=["127.0.0.0/8", "::1/128"]
    )
    assert SmtpSettings().client_limit_exceptions == listener.settings.client_limit_exceptions
    first, second = client(listener.port, "127.0.0.2"), client(listener.port, "127.0.0.2")
    try:
        assert first.noop()[0] == second.noop()[0] == 250
    finally:
        first.quit()
        second.quit()


def test_commands_without_a_message_are_limited_and_a_message_starts_the_count_anew(listen):
    listener = listen(command_call_limit=20, max_recipients=5)
    flooder = Raw(listener.port)
    try:
        flooder.send(b"EHLO flood.example.jp\r\n" + b"NOOP\r\n" * 100)
        replies = [flooder.reply()[0] for _ in range(21)]
        cut = flooder.closed_by_server()
    finally:
        flooder.close()
    sender = Raw(listener.port)
    try:
        sender.command(b"EHLO gw.example.jp")
        codes = []
        for _ in range(3):  # 15 NOOPs and a message, three times: 51 commands in all
            codes += [sender.command(b"NOOP")[0] for _ in range(15)]
            sender.transaction()
            sender.send(wire(b"Subject: ok\r\n\r\nbody\r\n"))
            codes.append(sender.reply()[0])
    finally:
        sender.close()
    assert replies == [250] * 20 + [421]  # EHLO and 19 NOOPs answered, then goodbye
    assert cut
    assert set(codes) == {250}
    assert len(listener.stored) == 3


class CountingHandler(IntakeHandler):
    noops = 0

    async def handle_NOOP(
        self, server: IntakeSMTP, session: Any, envelope: Any, arg: str | None
    ) -> str:
        self.noops += 1
        return "250 2.0.0 Ok"


def test_a_pipelining_client_gets_one_command_per_turn_of_the_event_loop(listen):
    """2,000 pipelined NOOPs arrive at once; between two turns of the loop (when every other
    connection gets its turn) the listener answers at most one or two of them."""
    listener = listen(handler_class=CountingHandler, command_call_limit=5000)
    handler = listener.handler
    assert isinstance(handler, CountingHandler)
    seen: list[int] = []
    ticking = [True]

    def tick() -> None:  # runs once per turn of the listener's loop
        seen.append(handler.noops)
        if ticking[0]:
            listener.loop.call_soon(tick)

    flooder = Raw(listener.port)
    try:
        flooder.command(b"EHLO flood.example.jp")
        listener.call(lambda: listener.loop.call_soon(tick))
        flooder.send(b"NOOP\r\n" * 2000)
        replies = [flooder.reply()[0] for _ in range(2000)]
    finally:
        ticking[0] = False
        flooder.close()
    seen.append(listener.call(lambda: handler.noops))
    per_turn = [later - earlier for earlier, later in itertools.pairwise(seen)]
    assert replies == [250] * 2000
    assert seen[-1] == 2000
    assert max(per_turn) <= 2, f"{max(per_turn)} commands answered in one turn of the loop"


def test_under_load_idle_connections_get_the_short_timeout(listen):
    listener = listen(max_connections=4, timeout_seconds=300, overload_timeout_seconds=0.2)
    idle = [Raw(listener.port, source) for source in ("127.0.0.2", "127.0.0.3")]
    try:
        for connection in idle:
            connection.command(b"EHLO idle.example.jp")
        idle.append(Raw(listener.port, "127.0.0.4"))  # 3 of 4: under load
        goodbyes = [connection.reply() for connection in idle]
        closed = [connection.closed_by_server() for connection in idle]
    finally:
        for connection in idle:
            connection.close()
    assert goodbyes == [(421, "4.4.2 Timeout exceeded, closing connection")] * 3
    assert closed == [True] * 3


def test_under_load_a_client_waiting_for_its_commit_is_not_timed_out(listen):
    commits: list[asyncio.Future[int]] = []

    async def slow(raw: bytes, envelope: Envelope) -> int:
        commit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        commits.append(commit)
        return await commit

    listener = listen(
        slow, max_connections=4, overload_timeout_seconds=0.2, store_timeout_seconds=300
    )
    sender = Raw(listener.port, "127.0.0.2")
    idle: list[Raw] = []
    try:
        sender.command(b"EHLO gw.example.jp")
        sender.transaction()
        sender.send(wire(b"Subject: slow commit\r\n\r\nbody\r\n"))
        wait_for(lambda: listener.call(lambda: len(commits)) == 1, "the commit to start")
        idle = [Raw(listener.port, source) for source in ("127.0.0.3", "127.0.0.4")]
        timed_out = [connection.reply()[0] for connection in idle]  # the load is real
        listener.call(lambda: commits[0].set_result(1))
        stored = sender.reply()
    finally:
        for connection in [sender, *idle]:
            connection.close()
    assert timed_out == [421, 421]
    assert stored == (250, "2.0.0 Ok: stored as 1")


# --- 4. AUTH brute force ------------------------------------------------------------------


def auth_plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


AUTH = {"auth_users": {"faxgw": "s3cret"}, "auth_require_tls": False}


def test_failed_logins_are_delayed_and_the_client_is_sent_away_after_a_few(listen):
    listener = listen(**AUTH, auth_failure_delay_seconds=0.01, auth_max_failures=3)
    guesser = Raw(listener.port)
    try:
        guesser.command(b"EHLO guess.example.jp")
        guesses = [guesser.command(auth_plain("faxgw", f"guess{i}"))[0] for i in range(3)]
        goodbye = guesser.reply()
        cut = guesser.closed_by_server()
    finally:
        guesser.close()
    with client(listener.port) as gateway:
        login = gateway.docmd(auth_plain("faxgw", "s3cret").decode())
    assert guesses == [535, 535, 535]
    assert goodbye == (421, "4.7.0 Too many failed logins, closing connection")
    assert cut
    assert listener.call(lambda: listener.handler.failed_logins) == 3
    assert login[0] == 235


def test_only_real_mechanisms_are_advertised(listen):
    """aiosmtpd takes every `auth_*` attribute of the handler and the session for a mechanism."""
    listener = listen(**AUTH)
    with client(listener.port) as gateway:
        gateway.ehlo("gw.example.jp")
        mechanisms = gateway.esmtp_features["auth"].split()
    assert sorted(mechanisms) == ["LOGIN", "PLAIN"]


def test_the_delay_after_a_failed_login_does_not_hold_up_other_clients(listen):
    listener = listen(**AUTH, auth_failure_delay_seconds=600)
    guesser = Raw(listener.port, "127.0.0.2")
    try:
        guesser.command(b"EHLO guess.example.jp")
        guesser.send(auth_plain("faxgw", "wrong") + b"\r\n")
        wait_for(lambda: listener.call(lambda: listener.handler.failed_logins) == 1, "a failure")
        with client(listener.port, "127.0.0.3") as other:
            served = other.noop()
        still_waiting = not guesser.has_data()
    finally:
        guesser.close()
    assert served[0] == 250
    assert still_waiting  # the guesser's 535 is ten minutes away; the loop is not


# --- 5. the envelope the ledger cannot store, STARTTLS inside TLS -------------------------


def test_control_characters_and_bytes_not_utf8_in_the_envelope_get_501_and_are_logged(
    listen, caplog
):
    listener = listen()
    raw = Raw(listener.port)
    caplog.set_level(logging.INFO, logger="sources.smtp")
    try:
        helo = raw.command(b"EHLO gw\x00.example.jp")
        raw.command(b"EHLO gw.example.jp")
        senders = [
            raw.command(b"MAIL FROM:<" + address + b">")
            for address in (b"fax\x00@fax.example.jp", b"fax\x1b@fax.example.jp", b"\xff@x.jp")
        ]
        raw.command(f"MAIL FROM:<{SENDER}>".encode())
        recipient = raw.command(b"RCPT TO:<inquiry\x00@wine-importer.example.jp>")
        raw.command(f"RCPT TO:<{INQUIRY}>".encode())
        raw.command(b"DATA")
        raw.send(wire(b"Subject: clean\r\n\r\nok\r\n"))
        stored = raw.reply()
    finally:
        raw.close()
    assert helo[0] == 501
    assert [code for code, _ in senders] == [501, 501, 501]
    assert senders[0][1].startswith("5.1.7 ")
    assert recipient[0] == 501 and recipient[1].startswith("5.1.3 ")
    assert stored[0] == 250
    (message,) = listener.stored
    assert (message[1].mail_from, message[1].rcpt_to) == (SENDER, (INQUIRY,))
    refusals = [r.getMessage() for r in caplog.records if ": refused: 5" in r.getMessage()]
    assert len(refusals) == 5  # every 5xx, with the peer and the reply
    assert all(re.search(r"ESMTP \[127\.0\.0\.1\]:\d+: refused: 501 5\.", r) for r in refusals)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, trustme.CA]:
    ca = trustme.CA()
    issued = ca.issue_cert("mx.test", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key, ca


def test_starttls_inside_tls_gets_554_and_the_session_goes_on(listen, certificate):
    cert, key, ca = certificate
    listener = listen(tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with client(listener.port) as sender:
        sender.starttls(context=context)
        sender.ehlo()
        offered = "starttls" in sender.esmtp_features
        again = sender.docmd("STARTTLS")
        after = sender.noop()
    assert not offered
    assert again == (554, b"5.5.1 Error: TLS already active")
    assert after[0] == 250


# --- 6. a store that does not return --------------------------------------------------------


def test_a_commit_that_does_not_return_is_answered_451_and_bounded(listen, caplog):
    commits: list[asyncio.Future[int]] = []

    async def frozen(raw: bytes, envelope: Envelope) -> int:
        commit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        commits.append(commit)
        return await commit  # a database that does not answer

    listener = listen(frozen, store_timeout_seconds=0.05, max_connections=2)
    caplog.set_level(logging.INFO, logger="sources.smtp")
    raw = Raw(listener.port)

    def send_one() -> tuple[int, str]:
        raw.transaction()
        raw.send(wire(b"Subject: frozen\r\n\r\nbody\r\n"))
        return raw.reply()

    try:
        raw.command(b"EHLO gw.example.jp")
        timed_out = [send_one(), send_one()]
        bounded = send_one()  # two commits still pending: this one is not even started
        calls_while_frozen = listener.call(lambda: len(commits))
        listener.call(lambda: commits[0].set_result(7))  # the first commit finishes, late
        wait_for(lambda: listener.call(lambda: listener.handler.stores_in_flight) == 1, "it")
        retried = send_one()
        calls_after = listener.call(lambda: len(commits))
    finally:
        raw.close()
    reply = (451, "4.3.0 Cannot store the message now, try again later")
    assert timed_out == [reply, reply]
    assert (bounded, calls_while_frozen) == (reply, 2)
    assert (retried, calls_after) == (reply, 3)
    assert any(
        "committed as ledger id 7 after the client" in r.getMessage() for r in caplog.records
    )


def test_lmtp_answers_a_commit_that_does_not_return_451_per_recipient(listen):
    async def frozen(raw: bytes, envelope: Envelope) -> int:
        return await asyncio.get_running_loop().create_future()

    listener = listen(frozen, protocol=IntakeLMTP, store_timeout_seconds=0.05)
    raw = Raw(listener.port)
    try:
        raw.command(b"LHLO mta.example.jp")
        raw.command(f"MAIL FROM:<{SENDER}>".encode())
        raw.command(f"RCPT TO:<{INQUIRY}>".encode())
        raw.command(f"RCPT TO:<{FAX}>".encode())
        raw.command(b"DATA")
        raw.send(wire(b"Subject: frozen\r\n\r\nbody\r\n"))
        replies = [raw.reply(), raw.reply()]
        after = raw.command(b"NOOP")
    finally:
        raw.close()
    assert replies == [
        (451, f"4.3.0 <{INQUIRY}> Cannot store the message now, try again later"),
        (451, f"4.3.0 <{FAX}> Cannot store the message now, try again later"),
    ]
    assert after[0] == 250
