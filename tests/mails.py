"""Small builders for test messages."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

from sqlalchemy.orm import Session, sessionmaker

from storage import repo


def simple_mail(
    subject: str = "在庫の問い合わせ",
    body: str = "ボルドーの在庫はありますか。",
    *,
    sender: str = "customer@example.com",
    to: str = "inquiry@wine-importer.example.jp",
    message_id: str | None = "auto",
    headers: dict[str, str] | None = None,
    attachments: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    if message_id == "auto":
        msg["Message-ID"] = make_msgid(domain="example.com")
    elif message_id:
        msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    for filename, ctype, content in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


UNFETCHED_REASON = "message is 90000000 bytes, over the limit"


def add_unfetched_row(sessions: sessionmaker[Session]) -> int:
    """A ledger row for an IMAP message too large to fetch, as the fetcher records it."""
    with sessions.begin() as session:
        return repo.add_unfetched(
            session,
            source="imap",
            size=90_000_000,
            message_id="<huge@example.com>",
            dedupe_key="imap:inquiry:INBOX:1:7",
            envelope={"account": "inquiry", "uid": 7},
            error=UNFETCHED_REASON,
        )
