"""Small builders for test messages."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid


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
