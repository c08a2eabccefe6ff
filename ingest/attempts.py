"""What a processing attempt records: who made it, and which process holds a message.

Used by the pipeline when it records an outcome, and by `ingest.replay`. Whether a failure
retries by itself, and when, is `ingest.retry`'s.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from storage import repo


@dataclass(frozen=True)
class Actor:
    """Who made an attempt: host, process, login and command line."""

    host: str
    pid: int
    username: str | None
    command: str


def current_actor() -> Actor:
    """The running process, read at call time (a forked worker has its own pid)."""
    try:
        username: str | None = getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        username = None
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    return Actor(socket.gethostname()[:255], os.getpid(), username and username[:64], command[:255])


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


SQLALCHEMY_FOOTER = "(Background on this error at:"  # SQLAlchemy's last line: a link, no news


def short_error(error: str | None) -> str | None:
    """The last line of a traceback: the exception type and message."""
    if not error:
        return error
    lines = [
        line
        for line in error.strip().splitlines()
        if line.strip() and not line.startswith(SQLALCHEMY_FOOTER)
    ]
    return lines[-1].strip() if lines else None


def record_attempt(
    session: Session,
    inbound_id: int,
    outcome: str,
    stage: str | None = None,
    error: str | None = None,
) -> None:
    """Add to the message's history, as made by this process, in the caller's transaction."""
    repo.add_attempt(
        session, inbound_id, outcome, stage=stage, error=error, **asdict(current_actor())
    )
