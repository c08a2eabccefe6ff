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
IDENTITY_HEADERS = ("From", "Date", "Subject")


def identity_of(raw: bytes, sha256: str) -> tuple[str | None, str]:
    """The Message-ID and the dedupe key of a message, from its header block only.

    Two deliveries are the same message when Message-ID, From, Date and Subject agree (relays
    add trace headers, so the bytes differ); without a Message-ID, when the bytes are identical.
    Comparing more than the Message-ID keeps distinct mails from mailers that reuse one.
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw.removeprefix(b"\xef\xbb\xbf"))
    found = MESSAGE_ID_RE.search(str(headers.get("Message-ID") or ""))
    if not found:
        return None, f"sha256:{sha256}"
    message_id = found.group(0)
    identity = "\n".join(
        [message_id, *(" ".join(str(headers.get(h) or "").split()) for h in IDENTITY_HEADERS)]
    )
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()
    return message_id, f"mid:{digest}"


def receive(sessions: sessionmaker[Session], raw: bytes, envelope: Envelope) -> int:
    """Commit `raw` to the ledger with status `received` and return the row id.

    Raises whatever the database raises; callers must not acknowledge the message then.
    """
    digest = hashlib.sha256(raw).hexdigest()
    message_id, key = identity_of(raw, digest)
    row = InboundMessage(
        source=envelope.source,
        raw=raw,
        size=len(raw),
        sha256=digest,
        message_id=message_id,
        dedupe_key=key,
        mail_from=envelope.mail_from,
        rcpt_to=list(envelope.rcpt_to),
        peer=envelope.peer,
        envelope=envelope.extra,
        status=MessageStatus.RECEIVED,
    )
    with sessions.begin() as session:
        session.add(row)
    return row.id
