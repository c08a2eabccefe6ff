"""IMAP fetchers: one per configured account and folder, each on its own connection.

The promise is the ledger's: a message is marked `\\Seen`, moved or deleted in the mailbox only
after `receive()` committed its raw bytes. The checkpoint (UIDVALIDITY, last UID) is saved after
each batch is acknowledged, so a reconnect or restart starts behind the last batch; if it was
interrupted between commit and acknowledgement, that batch is fetched again and the pipeline's
dedupe records the second copies as `duplicate` instead of opening second tickets. The same holds
when UIDVALIDITY changes and the folder is rescanned from the start.

Between fetches a fetcher waits in IDLE (renewed before servers drop it) or polls. Any failure
closes the connection; the fetcher reconnects after an exponential backoff with jitter, logging
one line per attempt, and reports itself stalled when it has not synced for a configured time.
A message that makes the server end the connection whenever it is fetched is recorded as failed
and left in the mailbox, so that it does not block the folder (see `_note_dropped`).

With several nodes on one store, one fetches a folder at a time: it holds the folder's lease
(`pipeline.leases.FolderLease`, renewed by a heartbeat), the others stand by and take over
`imap.failover_after` after the holder stopped renewing it, resuming from the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import shlex
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from imapclient import SEEN, IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config import ImapAccount, Settings
from ingest.headers import first_message_id, message_id_as_written
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.leases import FolderLease
from pipeline.retry import backoff_delay
from storage import repo
from storage.states import Source

log = logging.getLogger(__name__)

STOP_CHECK_SECONDS = 0.5  # how soon a waiting fetcher notices that it should stop
# Half of each reconnect wait is random, so fetchers that failed together do not retry in step.
RECONNECT_JITTER = 0.5
# A message that ended the connection this many times when fetched alone is given up on.
DROPS_BEFORE_GIVING_UP = 2
TOKEN_COMMAND_TIMEOUT_SECONDS = 30
HEADER_ITEM = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
HEADER_KEY = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"
EXISTS_RE = re.compile(rb"^\* \d+ EXISTS\r?\n?$", re.IGNORECASE)
BYE_RE = re.compile(rb"^\* BYE\b", re.IGNORECASE)


class CredentialError(Exception):
    """A password, token or CA file that cannot be had; the message names its source, never
    the secret."""


class ConnectionLost(Exception):
    """The server ended the connection (BYE, or end of stream) while we waited or fetched."""


class LeaseLost(Exception):
    """Another node holds this folder's lease (`imap_leases`): this one must not fetch it."""


class DroppedInFetch(ConnectionLost):
    """The connection ended during a FETCH: maybe the network, maybe a message the server cannot
    deliver (Dovecot answers one whose file it cannot read with `BYE FETCH failed`)."""


# Failures of the network, the server, the credentials or the database: logged in one line.
# Anything else is a bug and is logged with its traceback.
EXPECTED_ERRORS = (
    CredentialError,
    ConnectionLost,
    IMAPClientError,
    OSError,
    SQLAlchemyError,
    LeaseLost,
)

ReceivedHook = Callable[[int], None]


def _ignore(_value: int) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What a fetcher reports: `received` gets the ledger id of each message committed (the
    caller processes it or queues it), `found` the number of new messages in a folder before
    they are fetched, `unfetched` the ledger id of a message recorded as failed at fetch."""

    received: ReceivedHook
    found: Callable[[int], None] = _ignore
    unfetched: Callable[[int], None] = _ignore


# --- credentials and connections -------------------------------------------------------------


def password_of(account: ImapAccount) -> str:
    if account.password is not None:
        return account.password.get_secret_value()
    assert account.password_env is not None
    value = os.environ.get(account.password_env)
    if not value:
        raise CredentialError(
            f"account {account.name}: environment variable {account.password_env} "
            "(imap password_env) is not set"
        )
    return value


def access_token_of(account: ImapAccount) -> str:
    """An OAuth2 access token, read afresh on each login (tokens expire within hours)."""
    if account.token_file is not None:
        source = f"token_file {account.token_file}"
        try:
            token = account.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialError(
                f"account {account.name}: cannot read {source}: {exc.strerror or exc}"
            ) from exc
    else:
        assert account.token_command is not None
        source = "token_command"
        token = _run_token_command(account.name, account.token_command)
    if not token:
        raise CredentialError(f"account {account.name}: {source} gave an empty token")
    return token


def _run_token_command(name: str, command: str) -> str:
    try:
        result = subprocess.run(
            shlex.split(command),
            capture_output=True,
            text=True,
            timeout=TOKEN_COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CredentialError(
            f"account {name}: token_command did not finish within {TOKEN_COMMAND_TIMEOUT_SECONDS} s"
        ) from exc
    except OSError as exc:
        raise CredentialError(f"account {name}: cannot run token_command: {exc}") from exc
    if result.returncode != 0:
        # Its output is not logged: it may hold a token or a refresh token.
        raise CredentialError(
            f"account {name}: token_command exited with status {result.returncode}"
        )
    return result.stdout.strip()


def tls_context(account: ImapAccount) -> ssl.SSLContext | None:
    """Certificate and host name checked against `ca_file`, or the system CAs; None without TLS."""
    if account.security == "none":
        return None
    try:
        return ssl.create_default_context(cafile=account.ca_file)
    except OSError as exc:  # missing or unreadable file, or no PEM certificate in it (SSLError)
        raise CredentialError(
            f"account {account.name}: cannot load ca_file {account.ca_file}: {exc.strerror or exc}"
        ) from exc


def connect(account: ImapAccount, timeout: float) -> IMAPClient:
    """A logged-in connection, over TLS, STARTTLS or plain text as configured."""
    context = tls_context(account)
    client = IMAPClient(
        account.host,
        account.server_port,
        ssl=account.security == "tls",
        ssl_context=context,
        timeout=timeout,
    )
    try:
        if account.security == "starttls":
            client.starttls(context)
        if account.token_command is not None or account.token_file is not None:
            client.oauth2_login(account.username, access_token_of(account))
        else:
            client.login(account.username, password_of(account))
    except BaseException:
        _drop(client)
        raise
    return client


def _drop(client: IMAPClient) -> None:
    """Close a connection that may already be broken, without waiting for the server."""
    with suppress(OSError):
        client.shutdown()


def _logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except (IMAPClientError, OSError):
        _drop(client)


def _uid_range(uids: list[int]) -> str:
    return str(uids[0]) if len(uids) == 1 else f"{uids[0]}-{uids[-1]}"


def _server_text(exc: BaseException) -> str:
    """imapclient puts the server's reply in exceptions as a bytes repr; show it as text."""
    text = str(exc)
    match = re.fullmatch(r"""b(['"])(.*)\1""", text)
    return match.group(2) if match else text


# --- waiting in IDLE ---------------------------------------------------------------------------


def _readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _imaplib(client: IMAPClient) -> Any:
    """The imaplib connection inside imapclient, for the two things imapclient does not expose:
    untagged responses kept from earlier commands, and input already read into its buffer."""
    return client._imap


def _buffered(client: IMAPClient) -> bool:
    """Whether imaplib has already read input that poll() on the socket cannot see.

    Servers send news right after the `+ idling` continuation, often in the same packet;
    imaplib's buffered reader then holds it, and imapclient's idle_check(), which only polls
    the socket, would not notice it before the next packet (possibly the IDLE renewal, minutes
    later). The non-blocking peek looks at that buffer without waiting.
    """
    sock = client.socket()
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return bool(_imaplib(client).file.peek(1))
    except OSError:  # nothing buffered and nothing to read (EAGAIN, or SSL wants more)
        return False
    finally:
        sock.settimeout(timeout)


def _idle_line(client: IMAPClient, timeout: float) -> bytes | None:
    """The next line the server sends in IDLE, or None if none came within `timeout`."""
    if not _buffered(client) and not _readable(client.socket(), timeout):
        return None
    line: bytes = _imaplib(client).readline()
    if not line:
        raise ConnectionLost("the server closed the connection")
    return line


# --- one account's folder ----------------------------------------------------------------------


class FolderFetcher:
    """Fetches one folder of one account into the ledger; `run()` forever, `fetch_once()` for
    cron. Not thread-safe: one thread per fetcher."""

    def __init__(
        self,
        settings: Settings,
        account: ImapAccount,
        folder: str,
        sessions: sessionmaker[Session],
        hooks: Hooks,
    ) -> None:
        self.settings = settings
        self.imap = settings.imap
        self.account = account
        self.folder = folder
        self.sessions = sessions
        self.hooks = hooks
        self.label = f"{account.name}/{folder}"
        self._uidvalidity = 0
        self._last_uid = 0
        self._last_success = time.monotonic()
        self._stalled = False
        self.state = "connecting"  # then "ok" after each sync, "failing" after each failure
        self._stop = threading.Event()  # run()'s event: a long fetch stops between batches
        # UIDs in a FETCH that ended the connection: the server's words each time one was
        # fetched alone (an empty list: it was in a batch). See _note_dropped().
        self._dropped: dict[int, list[str]] = {}
        self._announced = 0  # highest UID reported to hooks.found
        self.found = 0  # new messages seen by this fetcher, each counted once
        # One node fetches a folder at a time; the others wait in `standby` (see run()).
        self.lease = FolderLease(sessions, account.name, folder, self.imap.failover_after)

    @property
    def server(self) -> str:
        return f"{self.account.host}:{self.account.server_port}"

    @property
    def seconds_since_success(self) -> float:
        """Since the last sync (a fetcher waiting in IDLE syncs at least every renewal)."""
        return time.monotonic() - self._last_success

    @property
    def stalled(self) -> bool:
        """Not synced for `imap.stalled_after_seconds` and not waiting on a live connection."""
        quiet = self.seconds_since_success >= self.imap.stalled_after_seconds
        return self.state not in ("ok", "standby") and quiet

    def fetch_once(self) -> int:
        """Fetch what is in the folder now; returns how many new messages there were.

        A connection that ends during a FETCH is opened again at once (as `run()` does after
        its backoff), so that a message the server cannot deliver ends up recorded as failed
        instead of failing every run; each retry gets closer to that (see `_note_dropped`).
        """
        found_before = self.found
        if not self.lease.acquire():
            raise LeaseLost("another node is fetching this folder (see imap_leases): not fetched")
        done = threading.Event()
        self._stop = self.lease.hold(done)
        try:
            while True:
                try:
                    with self._connection() as client:
                        self._sync(client)
                    return self.found - found_before
                except DroppedInFetch as exc:
                    log.warning("imap %s: %s; reconnecting", self.label, self.describe(exc))
        finally:
            done.set()
            self.lease.release()

    def run(self, stop: threading.Event) -> None:
        """Hold the folder's lease and fetch, wait for news, fetch again, until `stop` is set;
        never raises. While another node holds the lease this one waits in `standby`, trying
        again every third of `imap.failover_after`; it takes over once the holder stopped
        renewing it for that long (or at once, when the holder died on this host)."""
        self._last_success = time.monotonic()
        mode = "IDLE" if self.imap.idle else f"poll every {self.imap.poll_interval_seconds:g} s"
        log.info("imap %s: fetcher started on %s, %s", self.label, self.server, mode)
        while not stop.is_set():
            if not self._take_lease():
                stop.wait(self.imap.failover_after / 3)
                continue
            tenure = self.lease.hold(stop)
            try:
                self._fetch_until(tenure)
            finally:
                if stop.is_set():
                    self.lease.release()  # a clean stop hands the folder over at once

    def _take_lease(self) -> bool:
        """Become the folder's fetcher, logging each change between holder and standby."""
        try:
            taken = self.lease.acquire()
        except SQLAlchemyError as exc:
            self._report_failure(exc, self.imap.failover_after / 3)
            return False
        if taken:
            log.info("imap %s: lease taken (%s); fetching", self.label, self.lease.owner)
            self._last_success = time.monotonic()
            self.state = "connecting"
        elif self.state != "standby":
            log.info("imap %s: another node fetches this folder; standing by", self.label)
            self.state = "standby"
        return taken

    def _fetch_until(self, tenure: threading.Event) -> None:
        """Fetch, wait for news, fetch again, until `tenure` ends (stop, or the lease lost)."""
        self._stop = tenure
        failures = 0  # in a row: a sync starts the backoff over
        while not tenure.is_set():
            try:
                with self._connection() as client:
                    while not tenure.is_set():
                        self._sync(client)
                        failures = 0
                        self._succeeded()
                        self._wait_for_mail(client, tenure)
            except Exception as exc:
                failures += 1
                delay = backoff_delay(
                    failures,
                    self.imap.backoff_initial_seconds,
                    self.imap.backoff_max_seconds,
                    jitter=RECONNECT_JITTER,
                )
                self._report_failure(exc, delay)
                tenure.wait(delay)

    # connection and folder state

    @contextmanager
    def _connection(self) -> Iterator[IMAPClient]:
        client = connect(self.account, self.imap.timeout_seconds)
        try:
            self._open_folder(client)
            yield client
        except BaseException:
            _drop(client)
            raise
        _logout(client)

    def _open_folder(self, client: IMAPClient) -> None:
        """Select the folder and decide where to continue: behind the checkpoint, or from the
        start if the server's UIDVALIDITY is not the one the checkpoint belongs to."""
        uidvalidity = int(client.select_folder(self.folder)[b"UIDVALIDITY"])
        with self.sessions() as session:
            saved = repo.imap_checkpoint(session, self.account.name, self.folder)
        if uidvalidity != self._uidvalidity:
            self._dropped.clear()
            self._announced = 0
        self._uidvalidity = uidvalidity
        self._last_uid = 0
        if saved is not None and saved[0] == uidvalidity:
            self._last_uid = saved[1]
        elif saved is not None:
            log.warning(
                "imap %s: UIDVALIDITY changed from %s to %s; rescanning the folder (messages "
                "fetched before become duplicates, not tickets)",
                self.label,
                saved[0],
                uidvalidity,
            )
        if self.account.after == "move":
            self._prepare_move(client)

    def _prepare_move(self, client: IMAPClient) -> None:
        target = self.account.move_to
        assert target is not None
        if not client.has_capability("MOVE"):
            raise IMAPClientError(f"server {self.server} lacks MOVE; use after: seen or delete")
        if not client.folder_exists(target):
            log.info("imap %s: creating folder %s for after: move", self.label, target)
            client.create_folder(target)

    # fetching

    def _sync(self, client: IMAPClient) -> None:
        """Fetch new messages until the server has announced no more.

        The server may announce a message (EXISTS) in the response to any command, e.g. the
        SEARCH that just missed it; imaplib keeps such responses aside and IDLE will not repeat
        them, so without this loop that message would wait for the next IDLE renewal.
        """
        announced = _imaplib(client).untagged_responses
        while True:
            announced.clear()
            self._fetch_new(client)
            if "EXISTS" not in announced or self._stop.is_set():
                return

    def _fetch_new(self, client: IMAPClient) -> None:
        found = client.search(["UID", f"{self._last_uid + 1}:*"])
        # `n:*` always matches the highest UID, even when it is below n.
        uids = sorted(uid for uid in found if uid > self._last_uid)
        new = sum(uid > self._announced for uid in uids)  # not again after a reconnect
        self._announced = max([self._announced, *uids])
        self.found += new
        self.hooks.found(new)
        for batch in self._batches(uids):
            if self._stop.is_set():
                break
            self._fetch_batch(client, batch)

    def _batches(self, uids: list[int]) -> Iterator[list[int]]:
        """`imap.batch_size` UIDs at a time, but a UID that was in a dropped FETCH alone."""
        batch: list[int] = []
        for uid in uids:
            if uid in self._dropped:
                if batch:
                    yield batch
                    batch = []
                yield [uid]
                continue
            batch.append(uid)
            if len(batch) == self.imap.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _fetch_batch(self, client: IMAPClient, uids: list[int]) -> None:
        committed = self._commit_batch(client, uids)
        self._acknowledge(client, committed)
        with self.sessions.begin() as session:
            if not repo.holds_imap_lease(session, self.account.name, self.folder, self.lease.owner):
                self._stop.set()
                raise LeaseLost(f"the lease of {self.label} passed to another node; stopping")
            repo.save_imap_checkpoint(
                session, self.account.name, self.folder, self._uidvalidity, uids[-1]
            )
        self._last_uid = uids[-1]
        for uid in uids:
            self._dropped.pop(uid, None)

    def _commit_batch(self, client: IMAPClient, uids: list[int]) -> list[int]:
        """Fetch a batch and commit each message to the ledger, or record why not; returns the
        UIDs committed."""
        drops = self._dropped.get(uids[0], []) if len(uids) == 1 else []
        if len(drops) >= DROPS_BEFORE_GIVING_UP:
            reason = (
                f"{self.server} closed the connection each of the {len(drops)} times this "
                f"message was fetched (last: {drops[-1]})"
            )
            self._record_unfetched(uids[0], {}, reason)
            return []
        try:
            meta = client.fetch(uids, ["RFC822.SIZE", HEADER_ITEM])
            limit = self.settings.intake.max_message_bytes
            wanted = [uid for uid in uids if uid in meta and meta[uid][b"RFC822.SIZE"] <= limit]
            bodies = self._bodies(client, wanted)
        except (IMAPClientAbortError, OSError) as exc:
            self._note_dropped(uids, exc)
            raise DroppedInFetch(f"FETCH of uid {_uid_range(uids)}: {_server_text(exc)}") from exc
        committed = []
        for uid in uids:
            if uid not in meta:
                log.info("imap %s: uid %s was expunged before it was fetched", self.label, uid)
            elif uid not in wanted:
                size = meta[uid][b"RFC822.SIZE"]
                reason = f"message is {size} bytes, over intake.max_message_bytes ({limit})"
                self._record_unfetched(uid, meta[uid], reason)
            elif isinstance(body := bodies.get(uid), bytes):
                committed.append(uid)
                self._receive(uid, body)
            else:
                reason = body or "the server returned no content"
                self._record_unfetched(uid, meta[uid], reason)
        return committed

    def _note_dropped(self, uids: list[int], exc: BaseException) -> None:
        """Remember a FETCH that ended the connection. After reconnecting, its messages are
        fetched one by one; one that ends the connection again each time it is fetched alone
        is recorded failed (and left in the mailbox) instead of blocking the folder forever.
        A network failure does not pick one message out like that."""
        if len(uids) == 1:
            self._dropped.setdefault(uids[0], []).append(_server_text(exc) or type(exc).__name__)
        for uid in uids:
            self._dropped.setdefault(uid, [])

    def _bodies(self, client: IMAPClient, uids: list[int]) -> dict[int, bytes | str]:
        """Raw bytes per UID, or the reason the server would not give them. A refused batch is
        retried message by message so that one bad message does not hold up the rest."""
        if not uids:
            return {}
        try:
            return {u: d.get(b"BODY[]") for u, d in client.fetch(uids, ["BODY.PEEK[]"]).items()}
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            # The answers that came before the refusal stay in imaplib and would be merged into
            # the next FETCH's result, possibly as another message's (empty) content.
            _imaplib(client).untagged_responses.pop("FETCH", None)
            if len(uids) == 1:
                return {uids[0]: f"FETCH refused by {self.server}: {_server_text(exc)}"}
        bodies: dict[int, bytes | str] = {}
        for uid in uids:
            bodies.update(self._bodies(client, [uid]))
        return bodies

    def _envelope(self, uid: int) -> dict[str, Any]:
        return {
            "account": self.account.name,
            "folder": self.folder,
            "uidvalidity": self._uidvalidity,
            "uid": uid,
        }

    def _receive(self, uid: int, raw: bytes) -> None:
        envelope = Envelope(source=Source.IMAP, peer=self.server, extra=self._envelope(uid))
        inbound_id = receive(self.sessions, raw, envelope)
        mid = message_id_as_written(raw)
        log.info(
            "imap %s: uid %s %s, %d bytes: stored as ledger id %d",
            self.label,
            uid,
            mid,
            len(raw),
            inbound_id,
            extra={"inbound_id": inbound_id, "message_id": mid},
        )
        try:
            self.hooks.received(inbound_id)
        except Exception:
            # The message is safe in the ledger (status received); recovery processes it.
            log.exception("imap %s: handing on ledger row %s failed", self.label, inbound_id)

    def _record_unfetched(self, uid: int, meta: dict[bytes, Any], reason: str) -> None:
        """A failed ledger row for a message we leave in the mailbox, untouched, for a human."""
        header = meta.get(HEADER_KEY) or b""
        key = f"imap:{self.account.name}:{self.folder}:{self._uidvalidity}:{uid}"
        with self.sessions.begin() as session:
            inbound_id = repo.add_unfetched(
                session,
                source=Source.IMAP,
                size=int(meta.get(b"RFC822.SIZE") or 0),
                message_id=first_message_id(header),
                dedupe_key=key,
                envelope=self._envelope(uid),
                error=reason,
            )
        log.warning(
            "imap %s: uid %s %s not fetched, left in the mailbox; ledger row %s failed: %s",
            self.label,
            uid,
            first_message_id(header) or "(no Message-ID)",
            inbound_id,
            reason,
            extra={"inbound_id": inbound_id, "message_id": first_message_id(header)},
        )
        self.hooks.unfetched(inbound_id)

    def _acknowledge(self, client: IMAPClient, uids: list[int]) -> None:
        """The after-action, for messages whose raw bytes are committed."""
        if not uids:
            return
        if self.account.after == "seen":
            client.add_flags(uids, [SEEN])
        elif self.account.after == "move":
            client.move(uids, self.account.move_to)
        else:
            client.delete_messages(uids)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(uids)
            else:
                client.expunge()

    # waiting and health

    def _wait_for_mail(self, client: IMAPClient, stop: threading.Event) -> None:
        if self.imap.idle and client.has_capability("IDLE"):
            self._idle(client, stop)
        else:
            stop.wait(self.imap.poll_interval_seconds)

    def _idle(self, client: IMAPClient, stop: threading.Event) -> None:
        """Wait in IDLE until a message arrives, the renewal time is up, or `stop` is set."""
        client.idle()
        deadline = time.monotonic() + self.imap.idle_renew_seconds
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            line = _idle_line(client, min(STOP_CHECK_SECONDS, left))
            if line is None:
                continue
            if BYE_RE.match(line):
                raise ConnectionLost(f"the server said {line.decode('ascii', 'replace').strip()}")
            if EXISTS_RE.match(line):
                break
        client.idle_done()

    def _succeeded(self) -> None:
        self._last_success = time.monotonic()
        self.state = "ok"
        if self._stalled:
            self._stalled = False
            log.warning("imap %s: fetching again after a stall", self.label)

    def _report_failure(self, exc: Exception, delay: float) -> None:
        """One log line per failed attempt, then the stall report once it is overdue."""
        what = self.describe(exc)
        self.state = "failing"
        if isinstance(exc, EXPECTED_ERRORS):
            log.warning("imap %s: %s; reconnecting in %.1f s", self.label, what, delay)
        else:
            log.error("imap %s: %s; reconnecting in %.1f s", self.label, what, delay, exc_info=exc)
        quiet = time.monotonic() - self._last_success
        if not self._stalled and quiet >= self.imap.stalled_after_seconds:
            self._stalled = True
            log.error(
                "imap %s: stalled: no successful fetch for %.0f s (last error: %s)",
                self.label,
                quiet,
                what,
            )

    def describe(self, exc: Exception) -> str:
        """What went wrong, in words that name the server or the setting involved."""
        if isinstance(exc, LoginError):
            return f"login as {self.account.username} at {self.server} failed: {_server_text(exc)}"
        if isinstance(exc, CredentialError | LeaseLost):
            return str(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            trusted = f"ca_file {self.account.ca_file}" if self.account.ca_file else "system CAs"
            return (
                f"TLS certificate of {self.server} not accepted ({exc.verify_message}; "
                f"checked against the {trusted})"
            )
        if isinstance(exc, ConnectionLost | IMAPClientAbortError | OSError):
            return f"connection to {self.server} failed: {_server_text(exc) or type(exc).__name__}"
        if isinstance(exc, IMAPClientError):
            return f"server {self.server} refused: {_server_text(exc)}"
        if isinstance(exc, SQLAlchemyError):
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"database error, nothing acknowledged: {first_line}"
        return f"unexpected error: {type(exc).__name__}: {exc}"


# --- all fetchers ------------------------------------------------------------------------------


def folder_fetchers(
    settings: Settings,
    sessions: sessionmaker[Session],
    hooks: Hooks,
    account_name: str | None = None,
) -> list[FolderFetcher]:
    """A fetcher per configured account (or only `account_name`) and folder."""
    return [
        FolderFetcher(settings, account, folder, sessions, hooks)
        for account in settings.imap.accounts
        if account_name is None or account.name == account_name
        for folder in account.folders
    ]


def start_fetchers(
    settings: Settings,
    sessions: sessionmaker[Session],
    on_received: ReceivedHook,
    stop: threading.Event,
    account: str | None = None,
    fetchers: list[FolderFetcher] | None = None,
) -> list[threading.Thread]:
    """Start one daemon thread per account and folder; they end soon after `stop` is set.

    `on_received(ledger_id)` is called from those threads after each commit, before the
    message is acknowledged in the mailbox. `fetchers` are run instead of new ones (the
    service keeps them to report their state).
    """
    threads = []
    if fetchers is None:
        fetchers = folder_fetchers(settings, sessions, Hooks(on_received), account)
    for fetcher in fetchers:
        thread = threading.Thread(
            target=fetcher.run, args=(stop,), name=f"imap {fetcher.label}", daemon=True
        )
        thread.start()
        threads.append(thread)
    return threads


async def fetch_until_stopped(
    settings: Settings,
    sessions: sessionmaker[Session],
    on_received: ReceivedHook,
    stop: asyncio.Event,
    fetchers: list[FolderFetcher] | None = None,
) -> None:
    """The fetchers as a background task of `mailintake serve`: threads until `stop` is set."""
    halt = threading.Event()
    threads = start_fetchers(settings, sessions, on_received, halt, fetchers=fetchers)
    try:
        await stop.wait()
    finally:
        halt.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
