"""The ledger's front door: store the exact raw bytes, durably, before anyone says "accepted"."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ingest.headers import identity_of
from ingest.mail import Envelope, IncomingMail
from storage import repo
from storage.models import utcnow
from storage.states import Fate


def receive(sessions: sessionmaker[Session], raw: bytes, envelope: Envelope) -> int:
    """Commit `raw` to the ledger with status `received` and return the row id.

    Raises whatever the database raises; callers must not acknowledge the message then.
    """
    return receive_batch(sessions, [(raw, envelope)])[0]


def receive_batch(
    sessions: sessionmaker[Session], messages: Sequence[tuple[bytes, Envelope]]
) -> list[int]:
    """Commit several messages in one transaction (a backfill's batch, the SMTP sessions of one
    group commit); their row ids, in order. All are stored or, if the commit raises, none."""
    rows = [_ledger_row(raw, envelope) for raw, envelope in messages]
    with sessions.begin() as session:
        return repo.add_ledger_rows(session, rows, [raw for raw, _ in messages])


def _ledger_row(raw: bytes, envelope: Envelope) -> dict[str, Any]:
    digest = hashlib.sha256(raw).hexdigest()
    message_id, key = identity_of(raw, digest)
    return {
        "received_at": utcnow(),
        "source": envelope.source,
        "size": len(raw),
        "sha256": digest,
        "message_id": message_id,
        "dedupe_key": key,
        "mail_from": envelope.mail_from,
        "rcpt_to": list(envelope.rcpt_to),
        "peer": envelope.peer,
        "envelope": envelope.extra,
        "status": Fate.RECEIVED,
    }


def unstored_mail(raw: bytes, envelope: Envelope, received_at: datetime) -> IncomingMail:
    """An IncomingMail for bytes that are not in the ledger (`parse`, `rules test`, benches):
    ledger id 0, with the dedupe key a stored copy would have."""
    _message_id, key = identity_of(raw, hashlib.sha256(raw).hexdigest())
    return IncomingMail(0, raw, envelope, received_at, key)
