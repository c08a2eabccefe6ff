"""SMTP and LMTP listeners on aiosmtpd: a message is acknowledged only once the ledger has it.

The DATA handler hands the exact bytes to a `Store` (the service runs `intake.receive` in a
thread) and answers `250` only after the commit returned. Any fault of ours, a database that is
down or a disk that is full, answers `451 4.3.0` so the sender keeps the message and retries;
aiosmtpd's default `500` for handler exceptions is replaced by that `451` as well.

aiosmtpd answers a few cases itself with bare replies (a message over the size limit, a SIZE
parameter over it). `IntakeSMTP.push` rewrites those into replies with enhanced status codes,
and `IntakeLMTP` repeats DATA-phase failures once per recipient as RFC 2033 requires.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from config import SmtpSettings
from ingest.headers import message_id_as_written
from ingest.mail import Envelope

log = logging.getLogger(__name__)

Store = Callable[[bytes, Envelope], Awaitable[int]]
"""Commit raw bytes with their envelope to the ledger; returns the ledger id, raises on failure."""

REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_BUSY = "421 4.7.0 Too many connections, try again later"
REPLY_DENIED = "554 5.7.1 Your network is not allowed to send mail here"
REPLY_TOO_MANY_RCPT = "452 4.5.3 Too many recipients"


def too_big_reply(limit: int) -> str:
    return f"552 5.3.4 Message too big: the limit is {limit} bytes"


# aiosmtpd's own replies that we answer differently (see the module docstring).
AIOSMTPD_SIZE_REPLIES = (
    "552 Error: message size exceeds fixed maximum message size",
    "552 Error: Too much mail data",
)
AIOSMTPD_DATA_FAILURES = ("500 Line too long (see RFC5321 4.5.3.1.6)",)


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


class Door:
    """Who may connect (allow-list, connection limit), and who is still inside at shutdown.

    One `Door` serves the SMTP and the LMTP listener of a service, so `max_connections` counts
    both.
    """

    def __init__(self, settings: SmtpSettings) -> None:
        self.max_connections = settings.max_connections
        self.networks = list(settings.allow_networks)
        self.inside: set[IntakeSMTP] = set()
        self.closing = False

    def refusal(self, peer: Any) -> str | None:
        """Why a client at `peer` must not come in, as an SMTP reply, or None to admit it."""
        if self.closing:
            return REPLY_SHUTDOWN
        if len(self.inside) >= self.max_connections:
            return REPLY_BUSY
        if self.networks and not self._allowed(peer):
            return REPLY_DENIED
        return None

    def _allowed(self, peer: Any) -> bool:
        if not isinstance(peer, tuple):
            return False  # not an IP client (e.g. a Unix socket): the allow-list cannot vouch
        address = ipaddress.ip_address(peer[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # an IPv4 client of a dual-stack listener
        return any(address in network for network in self.networks)

    def send_idle_away(self) -> None:
        """Say goodbye to every client that is not in the middle of a mail transaction."""
        for protocol in list(self.inside):
            if protocol.idle:
                protocol.close_with(REPLY_SHUTDOWN)

    def send_all_away(self) -> None:
        """Close every connection; an unacknowledged message stays the sender's to retry."""
        for protocol in list(self.inside):
            protocol.close_with(REPLY_SHUTDOWN)


class IntakeSMTP(SMTP):
    """aiosmtpd's SMTP with the door check, enhanced status codes and a shutdown goodbye."""

    protocol_name = "ESMTP"

    def __init__(self, handler: IntakeHandler, *, door: Door, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.door = door
        self.refused = False

    def connection_made(self, transport: Any) -> None:
        first_time = self.transport is None  # STARTTLS calls this again with the TLS transport
        refusal = self.door.refusal(transport.get_extra_info("peername")) if first_time else None
        if refusal is not None:
            self.refused = True
            log.info("%s refused %s: %s", self.protocol_name, peer_text(transport), refusal)
            transport.write(refusal.encode("ascii") + b"\r\n")
            transport.close()
            return
        if first_time:
            self.door.inside.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        self.door.inside.discard(self)
        super().connection_lost(error)

    @property
    def idle(self) -> bool:
        """Not inside a mail transaction (nothing would be lost by closing now)."""
        return self.envelope is None or not self.envelope.mail_from

    def close_with(self, reply: str) -> None:
        if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
            self.transport.write(reply.encode("ascii") + b"\r\n")
            self.transport.close()

    async def push(self, status: Any) -> None:
        for reply in self.replies_for(status):
            await SMTP.push(self, reply)

    def replies_for(self, status: Any) -> list[Any]:
        """What to send for a reply aiosmtpd (or a handler) wants to send."""
        if status in AIOSMTPD_SIZE_REPLIES:
            log.info("%s %s: over-size message refused (552)", self.protocol_name, self.peer_text)
            return [too_big_reply(self.data_size_limit or 0)]
        return [status]

    @property
    def peer_text(self) -> str:
        return peer_text(self.transport) if self.transport else "(gone)"


class IntakeLMTP(IntakeSMTP, LMTP):
    """LMTP: after DATA one reply per accepted recipient (RFC 2033), failures included."""

    protocol_name = "LMTP"

    def replies_for(self, status: Any) -> list[Any]:
        replies = super().replies_for(status)
        data_failure = status in (*AIOSMTPD_SIZE_REPLIES, *AIOSMTPD_DATA_FAILURES)
        if data_failure and self.envelope is not None and self.envelope.mail_from:
            return replies * max(1, len(self.envelope.rcpt_tos))
        return replies


def peer_text(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return f"[{peer[0]}]:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")


class IntakeHandler:
    """aiosmtpd handler: recipient policy, then DATA -> `store` -> reply."""

    def __init__(
        self, settings: SmtpSettings, store: Store, *, max_bytes: int, hostname: str
    ) -> None:
        self.settings = settings
        self.policy = RecipientPolicy(settings)
        self.store = store
        self.max_bytes = max_bytes
        self.hostname = hostname

    async def handle_EHLO(
        self,
        server: IntakeSMTP,
        session: SmtpSession,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
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
        if not self.policy.accepts(address):
            log.info(
                "%s %s: recipient <%s> not accepted (550)",
                server.protocol_name,
                server.peer_text,
                address,
            )
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
        mid = message_id_as_written(raw)
        what = f"{server.protocol_name} {server.peer_text}: {mid}, {len(raw)} bytes"
        started = time.monotonic()
        try:
            ledger_envelope = make_envelope(server, session, envelope, self.hostname)
            inbound_id: int | None = await self.store(raw, ledger_envelope)
        except Exception as exc:
            inbound_id = None
            log.error("%s: not stored, answered 451: %s: %s", what, type(exc).__name__, exc)
        else:
            ms = (time.monotonic() - started) * 1000
            log.info("%s: stored as ledger id %d in %.0f ms", what, inbound_id, ms)
        if isinstance(server, IntakeLMTP):
            return [data_reply(inbound_id, rcpt) for rcpt in envelope.rcpt_tos]
        return [data_reply(inbound_id)]

    async def handle_exception(self, error: Exception) -> str:
        """Our own fault: the sender should retry, never treat it as a permanent failure."""
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        return REPLY_INTERNAL


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
        source="lmtp" if isinstance(server, IntakeLMTP) else "smtp",
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
