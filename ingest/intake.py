"""The ledger's front door: store the exact raw bytes, durably, before anyone says "accepted"."""

from __future__ import annotations

import hashlib
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy.orm import Session, sessionmaker

from ingest.mail import Envelope
from storage.models import InboundMessage, MessageStatus

MESSAGE_ID_RE = re.compile(r"<[^<>\s]+>")


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID from the header block (cheap: the body is not parsed)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw.removeprefix(b"\xef\xbb\xbf"))
    found = MESSAGE_ID_RE.search(str(headers.get("Message-ID") or ""))
    return found.group(0) if found else None


def dedupe_key(message_id: str | None, sha256: str) -> str:
    """What makes two deliveries the same message: its Message-ID, else its exact content."""
    return f"mid:{message_id}" if message_id else f"sha256:{sha256}"


def receive(sessions: sessionmaker[Session], raw: bytes, envelope: Envelope) -> int:
    """Commit `raw` to the ledger with status `received` and return the row id.

    Raises whatever the database raises; callers must not acknowledge the message then.
    """
    digest = hashlib.sha256(raw).hexdigest()
    message_id = message_id_of(raw)
    row = InboundMessage(
        source=envelope.source,
        raw=raw,
        size=len(raw),
        sha256=digest,
        message_id=message_id,
        dedupe_key=dedupe_key(message_id, digest),
        mail_from=envelope.mail_from,
        rcpt_to=list(envelope.rcpt_to),
        peer=envelope.peer,
        envelope=envelope.extra,
        status=MessageStatus.RECEIVED,
    )
    with sessions.begin() as session:
        session.add(row)
    return row.id
