"""Raw bytes -> ParsedMail. mail-parser reads the MIME structure; text is decoded here.

mail-parser (4.8) leaves 7-bit ISO-2022-JP bodies undecoded and garbles CP932 characters, so
headers and text parts are decoded from the raw part bytes with `charsets.decode_bytes`.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from email.header import decode_header
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import PurePosixPath

import mailparser
from inscriptis import get_text

from ingest.charsets import decode_bytes
from ingest.mail import MailAttachment, ParsedMail

MSGID_RE = re.compile(r"<[^<>\s]+>")
FILENAME_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)


class UnreadableMail(ValueError):
    """The bytes are not an email message at all."""


def decode_header_value(value: str | None, defects: list[str]) -> str:
    """Decode RFC 2047 encoded words and raw 8-bit bytes in one header value."""
    if value is None:
        return ""
    value = str(value)
    parts = []
    for chunk, charset in decode_header(value):
        raw = chunk if isinstance(chunk, bytes) else chunk.encode("utf-8", "surrogateescape")
        text, found = decode_bytes(raw.replace(b"\r", b"").replace(b"\n", b""), charset)
        defects.extend(found)
        parts.append(text)
    return "".join(parts).strip()


def _headers(msg: Message, defects: list[str]) -> list[tuple[str, str]]:
    return [(name, decode_header_value(value, defects)) for name, value in msg.items()]


def _addresses(values: list[str]) -> list[tuple[str, str]]:
    return [(name, addr) for name, addr in getaddresses(values) if addr]


def _message_ids(value: str | None) -> list[str]:
    return MSGID_RE.findall(value or "")


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None


def sanitise_filename(name: str, fallback: str) -> str:
    """A file name safe on any file system: no path, control characters or reserved names."""
    name = unicodedata.normalize("NFC", name)
    name = PurePosixPath(name.replace("\\", "/")).name
    name = FILENAME_FORBIDDEN.sub("_", name).strip(" .")
    if not name or WINDOWS_RESERVED.match(name):
        name = f"_{name}" if name else fallback
    return name[:255]


def _part_text(part: Message, defects: list[str]) -> str:
    payload = part.get_payload(decode=True) or b""
    text, found = decode_bytes(payload, part.get_content_charset())
    defects.extend(found)
    return text.replace("\r\n", "\n")


def _filename(part: Message, defects: list[str]) -> str | None:
    raw = part.get_param("filename", header="content-disposition") or part.get_param("name")
    if raw is None:
        return None
    if isinstance(raw, tuple):  # RFC 2231: (charset, language, value)
        charset, _lang, value = raw
        data = value.encode("latin-1", "surrogateescape") if isinstance(value, str) else value
        text, found = decode_bytes(data, charset or "utf-8")
        defects.extend(found)
        return text
    return decode_header_value(raw, defects)


class _Walker:
    """Collects text, HTML and attachments from a MIME tree."""

    def __init__(self, defects: list[str]) -> None:
        self.defects = defects
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.attachments: list[MailAttachment] = []

    def walk(self, part: Message) -> None:
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            self._attach(part, ctype, _filename(part, self.defects))
            return
        if part.is_multipart():
            for child in part.get_payload():
                self.walk(child)
            return
        filename = _filename(part, self.defects)
        disposition = (part.get_content_disposition() or "").lower()
        is_body = disposition != "attachment" and filename is None
        if ctype == "text/plain" and is_body:
            self.texts.append(_part_text(part, self.defects))
        elif ctype == "text/html" and is_body:
            self.htmls.append(_part_text(part, self.defects))
        elif part.get_payload(decode=True):
            self._attach(part, ctype, filename)

    def _attach(self, part: Message, ctype: str, filename: str | None) -> None:
        if ctype == "message/rfc822":
            inner = part.get_payload(0)
            content = inner.as_bytes() if isinstance(inner, Message) else b""
            original = filename or decode_header_value(inner.get("Subject"), self.defects)
            fallback = "forwarded.eml"
        else:
            content = part.get_payload(decode=True) or b""
            original = filename
            extension = (ctype.split("/")[-1] or "bin")[:10]
            fallback = f"attachment-{len(self.attachments) + 1}.{extension}"
        self.attachments.append(
            MailAttachment(
                filename=sanitise_filename(original or "", fallback),
                original_filename=original,
                content_type=ctype,
                content=content,
                inline=(part.get_content_disposition() or "") == "inline",
                content_id=(part.get("Content-ID") or "").strip() or None,
            )
        )


def html_to_text(html: str) -> str:
    return get_text(html).strip()


def parse(raw: bytes) -> ParsedMail:
    """Parse raw message bytes. Problems are collected as defects; only non-mail raises."""
    body = raw.removeprefix(b"\xef\xbb\xbf")
    if not body.strip():
        raise UnreadableMail("empty message")
    parser = mailparser.parse_from_bytes(body)
    msg: Message = parser.message
    defects = [f"mime: {d}" for d in (parser.defects_categories or [])]
    if not msg.keys():
        raise UnreadableMail("no headers found: not an email message")

    walker = _Walker(defects)
    walker.walk(msg)
    html = "\n".join(walker.htmls) or None
    text = "\n".join(t.strip("\n") for t in walker.texts).strip()
    if not text and html:
        text = html_to_text(html)

    from_name, from_email = next(iter(_addresses(msg.get_all("From", []))), (None, None))
    return ParsedMail(
        message_id=next(iter(_message_ids(msg.get("Message-ID"))), None),
        subject=decode_header_value(msg.get("Subject"), defects),
        from_name=decode_header_value(from_name, defects) or None,
        from_email=from_email.lower() if from_email else None,
        to=[a for _, a in _addresses(msg.get_all("To", []))],
        cc=[a for _, a in _addresses(msg.get_all("Cc", []))],
        date=_date(msg.get("Date")),
        headers=_headers(msg, defects),
        text=text,
        html=html,
        attachments=walker.attachments,
        in_reply_to=_message_ids(msg.get("In-Reply-To")),
        references=_message_ids(msg.get("References")),
        defects=list(dict.fromkeys(defects)),
    )
