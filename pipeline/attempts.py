"""What a processing attempt records: who made it. Used by the pipeline when it records an
outcome, and by `pipeline.replay`. Whether a failure retries by itself is `pipeline.retry`'s."""

from __future__ import annotations

import functools
import getpass
import os
import shlex
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ingest.mail import IncomingMail
from storage import repo


@dataclass(frozen=True)
class Actor:
    """Who made an attempt: host, process, login and command line."""

    host: str
    pid: int
    username: str | None
    command: str


def current_actor() -> Actor:
    """The running process, read once per pid (a forked worker has its own pid)."""
    return _actor_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _actor_of(pid: int) -> Actor:
    try:
        username: str | None = getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        username = None
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    return Actor(socket.gethostname(), pid, username, command)


def error_line(exc: BaseException) -> str:
    """The exception type and message on one line, for logs; a database error gives its
    driver's message, never its SQL or parameters (which may hold a whole mail)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc).__name__}: {type(exc.orig).__name__}: {' '.join(str(exc.orig).split())}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


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


def stage_timings(mail: IncomingMail, *, failed: bool = False) -> list[dict[str, object]]:
    """The ledger's `stage_timings`: each stage run with its milliseconds, in order (a JSON
    list, since PostgreSQL's JSON objects need not keep their order); when `failed`, the
    stage that raised is marked."""
    return [
        {"stage": stage, "ms": ms, **({"failed": True} if failed and stage == mail.stage else {})}
        for stage, ms in mail.timings_so_far().items()
    ]
