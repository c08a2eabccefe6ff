"""Processing leases: one process works on a message at a time, and a message whose processing
keeps dying (it may be what kills the process) stops being retried.

A lease is taken by a compare-and-set UPDATE committed before the work starts. A lease whose
holder died (a dead process or thread on this host, or an expired lease from another host) is
taken over at once and counted as an interrupted attempt.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from storage import repo
from storage.models import utcnow
from storage.states import PROCESSABLE

# A message whose last attempts all died unfinished is failed, stage `interrupted`, instead of
# tried again: a service that restarts would otherwise crash on it forever.
INTERRUPTED_LIMIT = 3
# How long a processing lease lasts: far longer than any message takes. A holder that dies on
# this host is noticed at once; one on another host when its lease runs out.
LEASE = timedelta(minutes=10)


def lease_owner() -> str:
    """How this thread names itself on a processing lease: `host:pid:thread`."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{threading.get_ident()}"


def lease_abandoned(owner: str, until: datetime | None, now: datetime) -> bool:
    """Whether a lease was left behind by an attempt that can no longer finish: its time ran
    out, or its holder on this host is gone (a dead process, an ended thread, or this very
    thread, which is not working on it any more). A restart after a crash need not wait."""
    if until is None or until <= now:
        return True
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != socket.gethostname()[:200]:
        return False  # another host's: only its expiry tells
    pid, thread = int(parts[1]), int(parts[2])
    if pid == os.getpid():
        live = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
        return thread not in live
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def take_lease(session: Session, inbound_id: int, owner: str) -> int | None:
    """Become the one process working on the message, in `session`'s transaction, which the
    caller commits before the work starts.

    Returns how many attempts in a row were interrupted (their lease left behind), or None if
    the message is done or another live process holds it.
    """
    now = utcnow()
    seen = repo.lease_of(session, inbound_id)
    if seen is None or seen.status not in PROCESSABLE:
        return None
    if seen.owner is not None and not lease_abandoned(seen.owner, seen.until, now):
        return None
    taken = repo.take_lease(session, inbound_id, seen, owner, now + LEASE)
    return taken[1] if taken else None
