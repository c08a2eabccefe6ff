"""Leases: one process works on a message at a time, one node fetches an IMAP folder at a time,
and a message whose processing keeps dying (it may be what kills the process) stops being retried.

A processing lease is taken by a compare-and-set UPDATE committed before the work starts. A lease
whose holder died is taken over at once and counted as an interrupted attempt: on this host a
holder is dead when its process is gone (or is another process under a reused pid, or ran before
a reboot); on another host, when its lease has run out. `claim_next` picks the next row any node
may take, with `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so several nodes on one store
never pick the same row and a dead node's backlog goes to the living ones.

An IMAP folder lease (`FolderLease`) is a row in `imap_leases` renewed by a heartbeat; when its
holder stops renewing it, another node takes it over once `imap.failover_after` has passed.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from storage import repo
from storage.models import utcnow
from storage.states import PROCESSABLE

log = logging.getLogger(__name__)

# A message whose last attempts all died unfinished is failed, stage `interrupted`, instead of
# tried again: a service that restarts would otherwise crash on it forever.
INTERRUPTED_LIMIT = 3
# How long a processing lease lasts: far longer than any message takes. A holder that dies on
# this host is noticed at once; one on another host when its lease runs out.
LEASE = timedelta(minutes=10)
# Free rows `claim_next` looks at in one go: a few, in case another process wins one (SQLite).
CLAIM_CANDIDATES = 4
# Rows leased on this host it looks at: more than one host's processes can hold (a lease each:
# at most processing.workers, 64, plus commands such as `failed replay`).
HELD_HERE = 100
HOST_LENGTH = 200


def _host() -> str:
    return socket.gethostname()[:HOST_LENGTH]


@functools.cache
def _boot_id() -> str:
    """This machine's boot (Linux: a random id per boot), so a lease from before a reboot is
    known dead although its pid may run again; '' where the system has none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip().replace("-", "")[:12]
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after `pid (comm)` (state first); [] where the system does
    not say or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            stat = file.read()
    except OSError:
        return []
    return stat.rsplit(")", 1)[-1].split()


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), telling a reused pid from the
    process that held a lease; '' where the system does not say."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""  # field 22, counted after `pid (comm)`


def _instance(pid: int) -> str:
    """The boot and the start time of process `pid`: with the host and the pid, a name no other
    process will ever have."""
    return f"{_boot_id()}.{_started(pid)}"


@functools.cache
def _own_instance(pid: int) -> str:
    """This process's `_instance`, read once (keyed by pid: a forked child reads its own)."""
    return _instance(pid)


def _ended(pid: int) -> bool:
    """Process `pid` has exited and only waits to be reaped (a zombie) or is being removed:
    it will never finish an attempt, though `kill(pid, 0)` still finds it."""
    fields = _stat(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def lease_owner() -> str:
    """How this thread names itself on a lease: `host:pid:thread:boot.start`."""
    pid = os.getpid()
    return f"{_host()}:{pid}:{threading.get_ident()}:{_own_instance(pid)}"


def lease_abandoned(owner: str, until: datetime | None, now: datetime) -> bool:
    """Whether a lease was left behind by an attempt that can no longer finish: its time ran
    out, or its holder on this host is gone (a dead process, reaped or not yet, a process from
    before a reboot, a pid now used by another process, an ended thread, or this very thread,
    which is not working on it any more). A restart after a crash need not wait."""
    if until is None or until <= now:
        return True
    parts = owner.split(":")
    if len(parts) not in (3, 4) or parts[0] != _host():
        return False  # another host's: only its expiry tells
    pid, thread = int(parts[1]), int(parts[2])
    if len(parts) == 4 and parts[3] != _instance(pid):
        return True  # an earlier boot's, or a process that ended and left its pid to another
    if pid == os.getpid():
        live = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
        return thread not in live
    if _ended(pid):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def take_lease(
    session: Session, inbound_id: int, owner: str, seen: repo.Lease | None = None
) -> int | None:
    """Become the one process working on the message, in `session`'s transaction, which the
    caller commits before the work starts (alone, or with the previous message's outcome).
    `seen`: the lease as the caller just read it with the row (else it is read here).

    Returns how many attempts in a row were interrupted (their lease left behind), or None if
    the message is done or another live process holds it.
    """
    now = utcnow()
    if seen is None:
        seen = repo.lease_of(session, inbound_id)
    if seen is None or seen.status not in PROCESSABLE:
        return None
    if seen.owner is not None and not lease_abandoned(seen.owner, seen.until, now):
        return None
    taken = repo.take_lease(session, inbound_id, seen, owner, now + LEASE)
    return taken[1] if taken else None


def claim_next(sessions: sessionmaker[Session], owner: str) -> tuple[int, int] | None:
    """Take the lease of the oldest message waiting that no living process holds, committed
    before the work starts: (ledger id, interruptions so far), or None when there is none.

    First among rows without a lease or with an expired one (any node's); then among those
    held on this host, whose holder may have died. On PostgreSQL the candidates are read `FOR
    UPDATE SKIP LOCKED`, so nodes claiming at the same moment each get other rows instead of
    waiting on, or racing for, one, and only a few rows are locked per claim.
    """
    with sessions.begin() as session:
        return claim_next_in(session, owner)


def claim_next_in(session: Session, owner: str) -> tuple[int, int] | None:
    """`claim_next` in the caller's transaction, which it commits before the work starts
    (alone, or with the previous message's outcome: one commit per message)."""
    now = utcnow()
    free = repo.lease_candidates(session, now, CLAIM_CANDIDATES)
    here = [] if free else repo.lease_candidates(session, now, HELD_HERE, f"{_host()}:")
    for inbound_id, seen in free + here:
        if seen.owner is not None and not lease_abandoned(seen.owner, seen.until, now):
            continue
        taken = repo.take_lease(session, inbound_id, seen, owner, now + LEASE)
        if taken:
            return inbound_id, taken[1]
    return None


class FolderLease:
    """The right to fetch one IMAP account's folder, held by one node at a time.

    `acquire()` takes the lease row if it is free, expired, or left by a dead process on this
    host; `hold()` renews it every third of `failover_after` in a thread and sets the returned
    event when the lease is lost (renewal refused, or the database unreachable until the lease
    would have run out), so the fetcher stops before another node may take over.
    """

    def __init__(
        self, sessions: sessionmaker[Session], account: str, folder: str, failover_after: float
    ) -> None:
        self.sessions = sessions
        self.account, self.folder = account, folder
        self.span = timedelta(seconds=failover_after)
        self.owner = ""

    def acquire(self) -> bool:
        """Become the folder's fetcher; False while another live node holds it."""
        self.owner = lease_owner()
        now = utcnow()
        with self.sessions.begin() as session:
            seen = repo.imap_lease_of(session, self.account, self.folder)
            if seen is not None and self._held_by_another(seen.owner, seen.until, now):
                return False
            return repo.take_imap_lease(
                session, self.account, self.folder, seen, self.owner, now, now + self.span
            )

    def _held_by_another(self, owner: str | None, until: datetime | None, now: datetime) -> bool:
        return owner not in (None, self.owner) and not lease_abandoned(str(owner), until, now)

    def renew(self) -> bool:
        """Push the lease's end further; False if it is no longer ours."""
        with self.sessions.begin() as session:
            end = utcnow() + self.span
            return repo.renew_imap_lease(session, self.account, self.folder, self.owner, end)

    def release(self) -> None:
        """Give the folder up at once (a clean stop: another node need not wait)."""
        try:
            with self.sessions.begin() as session:
                repo.release_imap_lease(session, self.account, self.folder, self.owner)
        except SQLAlchemyError as exc:
            log.warning("imap %s/%s: lease not released: %s", self.account, self.folder, exc)

    def hold(self, stop: threading.Event) -> threading.Event:
        """Renew the lease in a thread until `stop` or the loss of the lease; the event returned
        is set on either (the fetcher's own stop)."""
        lost = threading.Event()
        thread = threading.Thread(
            target=self._heartbeat, args=(stop, lost), name=f"lease {self.account}", daemon=True
        )
        thread.start()
        return lost

    def _heartbeat(self, stop: threading.Event, lost: threading.Event) -> None:
        beat = self.span.total_seconds() / 3
        renewed = utcnow()
        while not stop.wait(beat) and not lost.is_set():
            try:
                held = self.renew()
                renewed = utcnow()
            except SQLAlchemyError as exc:
                # Unreachable: keep fetching only while no other node can have taken over.
                held = utcnow() - renewed < self.span - timedelta(seconds=beat)
                log.warning("imap %s/%s: lease not renewed: %s", self.account, self.folder, exc)
            if not held and not lost.is_set():
                log.warning("imap %s/%s: lease lost; fetching stops", self.account, self.folder)
                break
        lost.set()
