"""SMTP and LMTP listeners on aiosmtpd: a message is acknowledged only once the ledger has it.

The DATA handler hands the exact bytes to a `Store` (the service runs `intake.receive` in a
thread) and answers `250` only after the commit returned. Any fault of ours, a database that is
down or a disk that is full, answers `451 4.3.0` so the sender keeps the message and retries;
aiosmtpd's default `500` for handler exceptions is replaced by that `451` as well, and so is a
commit that has not returned within `smtp.store_timeout_seconds`.

What aiosmtpd does not do for a listener that faces other people's programs:
- DATA is read in bulk (`read_message`), not line by line: no line-length limit (long HTML
  lines of web forms and FAX gateways, bare-LF mail), and a message over the size limit is
  discarded as it arrives, so a connection holds at most the size limit plus a small constant.
- `Door`: an allow-list, a connection limit shared by the SMTP and LMTP listeners, and per
  client address (as Postfix's anvil) a connection limit and a connection rate; a shorter
  timeout once the listener is busy.
- Per connection: a limit on commands answered without a message being accepted, a delay
  after each failed AUTH and a disconnect after a few, and one reply at a time (the event loop
  gets a turn after every reply, so a pipelining client cannot starve the others).
- The envelope (HELO name, MAIL FROM, RCPT TO) is refused with 501 when the ledger could not
  store it (control characters, bytes that are not UTF-8); a second STARTTLS gets 554.

aiosmtpd answers a few cases itself with bare replies (a SIZE parameter over the limit).
`IntakeSMTP.push` rewrites those into replies with enhanced status codes, logs every 5xx with
the peer, and `IntakeLMTP` repeats DATA-phase failures once per recipient as RFC 2033 requires.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from config import SmtpSettings
from ingest.headers import message_id_as_written, storable
from ingest.mail import Envelope
from pipeline.attempts import error_line
from storage.states import Source

log = logging.getLogger(__name__)

Store = Callable[[bytes, Envelope], Awaitable[int]]
"""Commit raw bytes with their envelope to the ledger; returns the ledger id, raises on failure."""

REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_BUSY = "421 4.7.0 Too many connections, try again later"
REPLY_CLIENT_BUSY = "421 4.7.0 Too many connections from your address, try again later"
REPLY_CLIENT_RATE = (
    "421 4.7.0 Too many connections from your address in the last minute, try again later"
)
REPLY_DENIED = "554 5.7.1 Your network is not allowed to send mail here"
REPLY_TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
REPLY_TOO_MANY_RCPT = "452 4.5.3 Too many recipients"
REPLY_TOO_MANY_COMMANDS = "421 4.7.0 Too many commands without a message, closing connection"
REPLY_AUTH_LOCKOUT = "421 4.7.0 Too many failed logins, closing connection"
REPLY_TLS_ACTIVE = "554 5.5.1 Error: TLS already active"
REPLY_BAD_HELO = "501 5.5.2 Bad HELO/EHLO hostname: control characters or bytes not UTF-8"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address: control characters or bytes not UTF-8"
REPLY_BAD_RECIPIENT = "501 5.1.3 Bad recipient address: control characters or bytes not UTF-8"

READ_LIMIT = 64 * 1024
"""The StreamReader's limit: the bulk size of DATA reads, and the most a command line buffers
before it is discarded (commands are still refused over aiosmtpd's 512-byte command limit)."""

OVERLOAD_SHARE = 0.75
"""The listener is under load (shorter timeouts) once this share of max_connections is used."""

MAX_TRACKED_CLIENTS = 10_000
"""Client addresses whose connection rate is remembered beyond those that are connected."""


def too_big_reply(limit: int) -> str:
    return f"552 5.3.4 Message too big: the limit is {limit} bytes"


# aiosmtpd's own replies that we answer differently (see the module docstring).
AIOSMTPD_SIZE_REPLIES = ("552 Error: message size exceeds fixed maximum message size",)
AIOSMTPD_FAULT_REPLIES = re.compile(r"500 Error: (\(|Cannot describe error)")
"""aiosmtpd's replies to an exception inside the exception handler: a fault of ours, so 451."""

UNSTORABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
"""Control characters, and bytes that are not UTF-8 (aiosmtpd keeps them as surrogates): the
ledger cannot store them (PostgreSQL refuses NUL), so such an envelope would get 451 forever."""


def unstorable(text: str) -> bool:
    return UNSTORABLE.search(text) is not None


class RecipientPolicy:
    """Which envelope recipients we take mail for; never a catch-all unless configured so."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.any = settings.accept_any_recipient
        self.addresses = {a.lower() for a in settings.accept_addresses}
        self.domains = {d.lower().rstrip(".") for d in settings.accept_domains}

    def accepts(self, address: str) -> bool:
        address = address.lower()
        domain = address.rpartition("@")[2].rstrip(".")
        return self.any or address in self.addresses or domain in self.domains


@dataclass
class Client:
    """What the door remembers of one client address: its connections and its rate budget."""

    connections: int = 0
    tokens: float = 0.0  # connections it may open now: a bucket refilled by the per-minute rate
    updated: float = 0.0


class Door:
    """Who may connect, and who is still inside at shutdown.

    Allow-list, a connection limit, and per client address (as Postfix's anvil) a connection
    limit and a connection rate, from which addresses in `client_limit_exceptions` are exempt.
    One `Door` serves the SMTP and the LMTP listener of a service, so the limits count both.
    `refusals` counts refused connections by reply, for metrics; `clock` is for tests.
    """

    def __init__(self, settings: SmtpSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = settings.max_connections
        self.networks = list(settings.allow_networks)
        self.per_client = settings.max_connections_per_client
        self.per_minute = settings.max_connections_per_client_per_minute
        self.exempt = list(settings.client_limit_exceptions)
        self.overload_at = max(1, math.ceil(settings.max_connections * OVERLOAD_SHARE))
        self.overload_timeout = settings.overload_timeout_seconds
        self.clock = clock
        self.inside: set[IntakeSMTP] = set()
        self.clients: dict[str, Client] = {}
        self.refusals: collections.Counter[str] = collections.Counter()
        self.closing = False

    @property
    def overloaded(self) -> bool:
        return len(self.inside) >= self.overload_at

    def timeout(self, normal: float) -> float:
        """The timeout for a connection's next wait: shorter while the listener is under load."""
        return min(normal, self.overload_timeout) if self.overloaded else normal

    def admit(self, protocol: IntakeSMTP, peer: Any) -> str | None:
        """Let `protocol` in, or leave it out and say why (an SMTP reply)."""
        address = ip_of(peer)
        refusal = self._refusal(address)
        key = None
        if refusal is None and address is not None and not within(address, self.exempt):
            key = str(address)
            refusal = self._client_refusal(key)
        if refusal is not None:
            self.refusals[refusal] += 1
            return refusal
        protocol.client_key = key
        self.inside.add(protocol)
        if self.overloaded:
            for other in self.inside:
                other.tighten_timeout(self.overload_timeout)
        return None

    def leave(self, protocol: IntakeSMTP) -> None:
        if protocol not in self.inside:
            return
        self.inside.discard(protocol)
        key = protocol.client_key
        client = self.clients.get(key) if key is not None else None
        if key is None or client is None:
            return
        client.connections -= 1
        if client.connections == 0 and (
            not self.per_minute or self._refill(client) >= self.per_minute
        ):
            del self.clients[key]  # nothing to remember: a new entry starts the same

    def _refusal(self, address: IPAddress | None) -> str | None:
        if self.closing:
            return REPLY_SHUTDOWN
        if self.networks and (address is None or not within(address, self.networks)):
            return REPLY_DENIED  # not an IP client (e.g. a Unix socket): the list cannot vouch
        if len(self.inside) >= self.max_connections:
            return REPLY_BUSY
        return None

    def _client_refusal(self, key: str) -> str | None:
        client = self.clients.get(key)
        if client is None:
            self._make_room()
            client = self.clients[key] = Client(tokens=self.per_minute, updated=self.clock())
        if client.connections >= self.per_client:
            return REPLY_CLIENT_BUSY
        if self.per_minute:
            if self._refill(client) < 1:
                return REPLY_CLIENT_RATE
            client.tokens -= 1
        client.connections += 1
        return None

    def _refill(self, client: Client) -> float:
        now = self.clock()
        budget = client.tokens + (now - client.updated) * self.per_minute / 60
        client.tokens, client.updated = min(float(self.per_minute), budget), now
        return client.tokens

    def _make_room(self) -> None:
        """Keep the table of client addresses bounded: forget idle ones, oldest first."""
        if len(self.clients) < MAX_TRACKED_CLIENTS:
            return
        idle = [key for key, client in self.clients.items() if client.connections == 0]
        for key in idle[: len(idle) // 2 + 1]:
            del self.clients[key]

    def send_idle_away(self) -> None:
        """Say goodbye to every client that is not in the middle of a mail transaction."""
        for protocol in list(self.inside):
            if protocol.idle:
                protocol.close_with(REPLY_SHUTDOWN)

    def send_all_away(self) -> None:
        """Close every connection; an unacknowledged message stays the sender's to retry."""
        for protocol in list(self.inside):
            protocol.close_with(REPLY_SHUTDOWN)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(peer: Any) -> IPAddress | None:
    """The client's IP address (an IPv4 client of a dual-stack listener as IPv4), or None."""
    if not isinstance(peer, tuple):
        return None
    address = ipaddress.ip_address(peer[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def within(address: IPAddress, networks: list[Any]) -> bool:
    return any(address in network for network in networks)


async def read_message(
    reader: asyncio.StreamReader, limit: int, progress: Callable[[int], None] | None = None
) -> bytes | None:
    """The message a client sends after DATA's 354, dot-unstuffed; None if over `limit` bytes.

    Reads in bulk: up to the next ".\\r\\n", or as much as the reader holds once that is more
    than its limit; never a line at a time, and without any line-length limit. Only CRLF "."
    CRLF ends the data (RFC 5321 4.1.1.4; at the very start "." CRLF): a bare LF is content,
    never a line end. Over `limit` the content is dropped as it arrives and the rest is read to
    the end of the data, so client and server stay in step; nothing after the end is consumed
    (a pipelining client's next command stays in `reader`). `progress(held)` is called after
    each read with the number of bytes held.
    """
    content = bytearray()
    over = False
    before = b"\r\n"  # the two bytes read before the next chunk: DATA starts a line
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" starts in these bytes; a piece at a time bounds the copies.
            chunk = await reader.read(min(exc.consumed, READ_LIMIT))
        end = (before + chunk[-5:])[-5:] == b"\r\n.\r\n"
        if not over:
            piece = unstuff(before, chunk[:-3] if end else chunk)  # CRLF before "." is content
            if len(content) + len(piece) > limit:
                over = True
                content = bytearray()
            else:
                content += piece
        before = (before + chunk[-2:])[-2:]
        if progress is not None:
            progress(len(content))
        if end:
            return None if over else bytes(content)


def unstuff(before: bytes, data: bytes) -> bytes:
    """`data` without the "." that starts each line (RFC 5321 4.5.2); `before` holds the two
    bytes read before `data`, so that a CRLF split between two reads is seen."""
    if b"\r\n." not in before + data[:2] and b"\r\n." not in data:
        return data
    return (before + data).replace(b"\r\n.", b"\r\n")[len(before) :]


class IntakeSMTP(SMTP):
    """aiosmtpd's SMTP with the door, bulk DATA, limits, enhanced codes and a shutdown goodbye."""

    protocol_name = "ESMTP"
    line_length_limit = READ_LIMIT  # aiosmtpd's StreamReader limit (see READ_LIMIT)

    def __init__(self, handler: IntakeHandler, *, door: Door, **kwargs: Any) -> None:
        # aiosmtpd keeps these on the class and raises them on every EHLO: ours are per connection.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        settings = handler.settings
        self.door = door
        self.timeout_seconds = settings.timeout_seconds
        self.store_timeout = settings.store_timeout_seconds
        self.storing = False
        self.command_limit = settings.command_call_limit
        self.auth_failure_delay = settings.auth_failure_delay_seconds
        self.auth_max_failures = settings.auth_max_failures
        self.refused = False
        self.client_key: str | None = None  # the address the per-client limits count it under
        self.greeted = False
        self.commands_answered = 0  # since the last accepted message
        self.failed_logins = 0
        self.held_bytes = 0  # message bytes held while reading DATA
        self.peak_held_bytes = 0
        self._deadline = 0.0

    def connection_made(self, transport: Any) -> None:
        if self.transport is None:  # not again when STARTTLS calls this with the TLS transport
            refusal = self.door.admit(self, transport.get_extra_info("peername"))
            if refusal is not None:
                self.refused = True
                log.info("%s refused %s: %s", self.protocol_name, peer_text(transport), refusal)
                transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        self.door.leave(self)
        super().connection_lost(error)

    @property
    def idle(self) -> bool:
        """Not inside a mail transaction (nothing would be lost by closing now)."""
        return self.envelope is None or not self.envelope.mail_from

    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close_with(self, *replies: str) -> None:
        if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
            self.transport.write("".join(f"{reply}\r\n" for reply in replies).encode())
            self.transport.close()

    # Timeouts: per wait for a command or a piece of DATA, shorter while the listener is busy.

    def _reset_timeout(self, duration: float | None = None) -> None:
        duration = duration or self.door.timeout(self.timeout_seconds)
        super()._reset_timeout(duration)
        self._deadline = self.loop.time() + duration

    def tighten_timeout(self, duration: float) -> None:
        """Time out within `duration` from now if the current timeout is later (not while
        the client waits for our commit)."""
        if self.connected and not self.storing and self._deadline > self.loop.time() + duration:
            self._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        log.info("%s %s: timeout, closing", self.protocol_name, self.peer_text)
        self.close_with(REPLY_TIMEOUT)

    # Replies: every reply goes through push.

    async def push(self, status: Any) -> None:
        """Send a reply; count it against the command limit, delay a failed login, log a 5xx,
        then let the other connections have a turn (a pipelining client cannot hog the loop)."""
        for reply in self.replies_for(status):
            if not self.connected:
                return  # we said goodbye, or the client left
            text = reply if isinstance(reply, str) else reply.decode("utf-8", "replace")
            if text.startswith("535") and not await self._login_failed(text):
                return
            if not self.greeted:
                self.greeted = True  # the greeting answers no command
            elif text[3:4] != "-":  # the last line of a reply: one command answered
                self.commands_answered += 1
                if self.commands_answered > self.command_limit:
                    log.warning(
                        "%s %s: %d commands without a message, closing",
                        self.protocol_name,
                        self.peer_text,
                        self.command_limit,
                    )
                    self.close_with(REPLY_TOO_MANY_COMMANDS)
                    return
            if text.startswith("5"):  # aiosmtpd's replies may echo the client's bytes
                shown = storable(text)
                log.info("%s %s: refused: %s", self.protocol_name, self.peer_text, shown)
            if text[3:4] != "-":
                self.event_handler.replies[text[:3]] += 1
            await SMTP.push(self, reply)
        await asyncio.sleep(0)

    def replies_for(self, status: Any) -> list[Any]:
        """What to send for a reply aiosmtpd (or a handler) wants to send."""
        if status in AIOSMTPD_SIZE_REPLIES:
            return [too_big_reply(self.data_size_limit or 0)]
        if isinstance(status, str) and AIOSMTPD_FAULT_REPLIES.match(status):
            log.error("%s %s: %s, answered 451", self.protocol_name, self.peer_text, status)
            return [REPLY_INTERNAL]
        return [status]

    def data_replies(self, reply: str) -> list[str]:
        """The replies to a DATA that failed: one (LMTP: one per recipient)."""
        return [reply]

    async def _login_failed(self, reply: str) -> bool:
        """Count a failed AUTH and answer it only after a delay (without blocking the loop);
        after `auth_max_failures` send `reply` with a goodbye. False once closed."""
        self.failed_logins += 1
        self.event_handler.failed_logins += 1
        await asyncio.sleep(self.auth_failure_delay)
        if self.failed_logins < self.auth_max_failures:
            return self.connected
        log.warning(
            "%s %s: %d failed logins, closing: %s",
            self.protocol_name,
            self.peer_text,
            self.failed_logins,
            reply,
        )
        self.close_with(reply, REPLY_AUTH_LOCKOUT)
        return False

    def message_accepted(self) -> None:
        self.commands_answered = 0

    # Commands we answer differently from aiosmtpd.

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.transport is not None and self.transport.get_extra_info("ssl_object"):
            await self.push(REPLY_TLS_ACTIVE)  # RFC 3207: no STARTTLS inside TLS
            return
        await super().smtp_STARTTLS(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit
        assert limit, "the listener always has a size limit"
        try:
            content = await read_message(self._reader, limit, self._data_arrived)
        except asyncio.IncompleteReadError:
            raise asyncio.CancelledError from None  # the client left: as aiosmtpd's EOF does
        finally:
            self.held_bytes = 0
        if content is None:
            for reply in self.data_replies(too_big_reply(limit)):
                await self.push(reply)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = content
        # The client waits for our commit: no idle timeout (under load shorter) cuts it short.
        self.storing = True
        self._reset_timeout(self.store_timeout + self.timeout_seconds)
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.storing = False
        self._reset_timeout()
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def _data_arrived(self, held: int) -> None:
        self._reset_timeout()  # the timeout is per read, as for commands
        self.held_bytes = held
        self.peak_held_bytes = max(self.peak_held_bytes, held)

    @property
    def peer_text(self) -> str:
        return peer_text(self.transport) if self.transport else "(gone)"


class IntakeLMTP(IntakeSMTP, LMTP):
    """LMTP: after DATA one reply per accepted recipient (RFC 2033), failures included."""

    protocol_name = "LMTP"

    def data_replies(self, reply: str) -> list[str]:
        recipients = len(self.envelope.rcpt_tos) if self.envelope is not None else 1
        return [reply] * max(1, recipients)


def peer_text(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return f"[{peer[0]}]:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")


class StoreTimeout(Exception):
    """The commit did not return in time; it may still finish (a retry is then a duplicate)."""


class StoreBusy(Exception):
    """Too many commits have not returned: do not queue another message's bytes."""


class IntakeHandler:
    """aiosmtpd handler: envelope checks, recipient policy, then DATA -> `store` -> reply.

    `failed_logins` (failed logins on all connections), `stores_in_flight` (commits not yet
    returned, those answered 451 on timeout included), `replies` (replies sent, by code) and
    `on_data_reply(code, seconds)` (each DATA answered, and how long the client waited for it)
    are there for metrics.
    """

    def __init__(
        self, settings: SmtpSettings, store: Store, *, max_bytes: int, hostname: str
    ) -> None:
        self.settings = settings
        self.policy = RecipientPolicy(settings)
        self.store = store
        self.max_bytes = max_bytes
        self.hostname = hostname
        self.failed_logins = 0
        self.stores_in_flight = 0
        self.replies: collections.Counter[str] = collections.Counter()
        self.on_data_reply: Callable[[str, float], None] | None = None
        # A commit that never returns keeps its message's bytes: at most one per connection.
        self.max_stores_in_flight = settings.max_connections

    async def handle_HELO(
        self, server: IntakeSMTP, session: SmtpSession, envelope: SmtpEnvelope, hostname: str
    ) -> str:
        if unstorable(hostname):
            session.host_name = None
            return REPLY_BAD_HELO
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: IntakeSMTP,
        session: SmtpSession,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if unstorable(hostname):
            session.host_name = None
            return [REPLY_BAD_HELO]
        session.host_name = hostname
        if not self.settings.auth_users:  # do not offer an AUTH that can never succeed
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(
        self,
        server: IntakeSMTP,
        session: SmtpSession,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if server.door.closing and server.transport is not None:
            server.loop.call_soon(server.transport.close)  # after the 421 below is written
            return REPLY_SHUTDOWN
        if unstorable(address) or any(unstorable(option) for option in mail_options):
            return REPLY_BAD_SENDER
        envelope.mail_from = address  # "<>" for the null sender, as aiosmtpd needs it truthy
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self,
        server: IntakeSMTP,
        session: SmtpSession,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if unstorable(address):
            return REPLY_BAD_RECIPIENT
        if not self.policy.accepts(address):
            return f"550 5.1.1 <{address}>: recipient not accepted here"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return REPLY_TOO_MANY_RCPT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(
        self, server: IntakeSMTP, session: SmtpSession, envelope: SmtpEnvelope
    ) -> str:
        raw = envelope.original_content or b""
        replies = await self._deliver(server, session, envelope, raw)
        for reply in replies[:-1]:  # LMTP: one per recipient; SMTP has one only
            await server.push(reply)
        return replies[-1]

    async def _deliver(
        self, server: IntakeSMTP, session: SmtpSession, envelope: SmtpEnvelope, raw: bytes
    ) -> list[str]:
        """Store the message; the replies to send, one per recipient for LMTP.

        One log line per message: peer, Message-ID, size, and ledger id or why it was refused.
        """
        mid = message_id_as_written(header_section(raw))
        what = f"{server.protocol_name} {server.peer_text}: {mid}, {len(raw)} bytes"
        started = time.monotonic()
        try:
            ledger_envelope = make_envelope(server, session, envelope, self.hostname)
            inbound_id: int | None = await self._store_in_time(raw, ledger_envelope, what)
        except Exception as exc:
            inbound_id = None
            log.error(
                "%s: not stored, answered 451: %s",
                what,
                error_line(exc),
                extra={"message_id": mid},
            )
        else:
            ms = (time.monotonic() - started) * 1000
            fields = {"inbound_id": inbound_id, "message_id": mid}
            log.info("%s: stored as ledger id %d in %.0f ms", what, inbound_id, ms, extra=fields)
            server.message_accepted()
        if self.on_data_reply is not None:
            self.on_data_reply("451" if inbound_id is None else "250", time.monotonic() - started)
        if isinstance(server, IntakeLMTP):
            return [data_reply(inbound_id, rcpt) for rcpt in envelope.rcpt_tos]
        return [data_reply(inbound_id)]

    async def _store_in_time(self, raw: bytes, envelope: Envelope, what: str) -> int:
        """`store`, or StoreTimeout after `smtp.store_timeout_seconds`.

        The commit is not cancelled (a thread cannot be): it may still finish, and the sender's
        retry of a message answered 451 is then recorded as a duplicate. Commits that have not
        returned are bounded by `max_stores_in_flight`; beyond it StoreBusy, without storing.
        """
        if self.stores_in_flight >= self.max_stores_in_flight:
            raise StoreBusy(f"{self.stores_in_flight} earlier commits have not returned yet")
        timeout = self.settings.store_timeout_seconds
        task = asyncio.ensure_future(self.store(raw, envelope))
        self.stores_in_flight += 1
        abandoned = False

        def finished(task: asyncio.Future[int]) -> None:
            self.stores_in_flight -= 1
            if task.cancelled():
                return
            error = task.exception()
            if not abandoned:
                return
            if error is None:
                log.warning(
                    "%s: committed as ledger id %d after the client was answered 451 or left; "
                    "its retry will be a duplicate",
                    what,
                    task.result(),
                )
            else:
                log.error("%s: late commit failed: %s: %s", what, type(error).__name__, error)

        task.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            abandoned = True
            raise StoreTimeout(f"not committed within {timeout:g} s (it may still be)") from None
        except asyncio.CancelledError:
            abandoned = True  # the client left while we waited
            raise

    async def handle_exception(self, error: Exception) -> str:
        """Our own fault: the sender should retry, never treat it as a permanent failure."""
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        return REPLY_INTERNAL


def header_section(raw: bytes) -> bytes:
    """`raw` up to its first empty line: what a log line needs, without the email parser
    reading every line of the body on the event loop (20 ms for a 260 KB message)."""
    ends = [end for end in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if end >= 0]
    return raw[: min(ends) + 2] if ends else raw


def data_reply(inbound_id: int | None, rcpt: str | None = None) -> str:
    """The reply to DATA: stored (250) or not (451); LMTP names the recipient."""
    who = f"<{rcpt}> " if rcpt else ""
    if inbound_id is None:
        return f"451 4.3.0 {who}Cannot store the message now, try again later"
    return f"250 2.0.0 {who}Ok: stored as {inbound_id}"


def make_envelope(
    server: IntakeSMTP, session: SmtpSession, envelope: SmtpEnvelope, hostname: str
) -> Envelope:
    """The ledger envelope: who sent what to whom, over what; the raw bytes stay untouched."""
    peer = server.transport.get_extra_info("peername") if server.transport else None
    ip, port = (peer[0], peer[1]) if isinstance(peer, tuple) else (None, None)
    tls = tls_info(server)
    auth_user = auth_user_of(session)
    extra = {
        "helo": session.host_name,
        "peer_port": port,
        "tls": tls,
        "auth_user": auth_user,
        "mail_options": list(envelope.mail_options),
        "received": received_trace(
            server, session.host_name, ip, hostname, tls is not None, auth_user is not None
        ),
    }
    return Envelope(
        source=Source.LMTP if isinstance(server, IntakeLMTP) else Source.SMTP,
        mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
        rcpt_to=tuple(envelope.rcpt_tos),
        peer=ip,
        extra=extra,
    )


def tls_info(server: IntakeSMTP) -> dict[str, Any] | None:
    ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return {"version": ssl_object.version(), "cipher": cipher[0] if cipher else None}


def auth_user_of(session: SmtpSession) -> str | None:
    if not session.authenticated or not isinstance(session.auth_data, LoginPassword):
        return None
    return session.auth_data.login.decode("utf-8", "replace")


def received_trace(
    server: IntakeSMTP, helo: str | None, ip: str | None, hostname: str, tls: bool, auth: bool
) -> str:
    """A `Received:` field body (RFC 5321 4.4, protocol names of RFC 3848), kept in the envelope."""
    protocol = server.protocol_name
    if protocol == "ESMTP":
        protocol += ("S" if tls else "") + ("A" if auth else "")
    return (
        f"from {helo or 'unknown'} ([{ip or 'unknown'}]) by {hostname} (mailintake) "
        f"with {protocol}; {formatdate(localtime=True)}"
    )


class UserAuthenticator:
    """AUTH PLAIN/LOGIN against the configured `smtp.auth_users`."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.users = {
            name: secret.get_secret_value() for name, secret in settings.auth_users.items()
        }

    def __call__(
        self,
        server: IntakeSMTP,
        session: SmtpSession,
        envelope: SmtpEnvelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        expected = self.users.get(login)
        ok = expected is not None and hmac.compare_digest(
            expected.encode("utf-8"), auth_data.password
        )
        outcome = "succeeded" if ok else "failed"
        log.info(
            "%s %s: AUTH %s as %r %s",
            server.protocol_name,
            server.peer_text,
            mechanism,
            login,
            outcome,
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    """The STARTTLS context, or None when no certificate is configured."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def protocol_factory(
    protocol: type[IntakeSMTP],
    handler: IntakeHandler,
    door: Door,
    settings: SmtpSettings,
    context: ssl.SSLContext | None,
) -> Callable[[], IntakeSMTP]:
    """What `loop.create_server` calls for each new connection."""
    authenticator = UserAuthenticator(settings) if settings.auth_users else None

    def make() -> IntakeSMTP:
        return protocol(
            handler,
            door=door,
            data_size_limit=handler.max_bytes,
            enable_SMTPUTF8=True,
            hostname=handler.hostname,
            ident="mailintake",
            tls_context=context,
            require_starttls=settings.require_tls,
            timeout=settings.timeout_seconds,
            auth_required=settings.auth_required,
            auth_require_tls=settings.auth_require_tls,
            authenticator=authenticator,
        )

    return make
