"""Raw bytes -> ParsedMail. mail-parser reads the MIME structure; text is decoded here.

mail-parser (4.8) leaves 7-bit ISO-2022-JP bodies undecoded, garbles CP932 characters and hands
back raw 8-bit headers as replacement characters, so header values are read undecoded
(`Message.raw_items`) and headers and text parts are decoded with `charsets.decode_bytes`.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from datetime import datetime
from email import message_from_bytes
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import PurePosixPath
from urllib.parse import unquote_to_bytes

import mailparser
from inscriptis import get_text

from ingest.charsets import decode_bytes
from ingest.headers import BOM, decode_header_value, message_ids, raw_header, raw_headers, unfold
from ingest.mail import MailAttachment, ParsedMail

FILENAME_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)
# The start of each parameter in a header; values between are taken whole, so an unquoted
# RFC 2231 value with `;` or `"` inside (seen from Japanese mailers) stays in one piece.
PARAM_START = re.compile(r";\s*([A-Za-z0-9_.-]+?)(\*\d+)?(\*)?\s*=")
MAX_DEPTH = 32  # MIME nesting beyond this is not read (attachment bombs, endless nesting)
# Transfer encodings RFC 2046 forbids on message/rfc822, but which some mailers still use.
ENCODED_TRANSFER = {"base64", "quoted-printable"}


class UnreadableMail(ValueError):
    """The bytes are not an email message at all."""


def _addresses(values: list[str], defects: list[str]) -> list[tuple[str, str]]:
    """(display name, address) pairs, decoded. Raw ISO-2022-JP or 8-bit values are decoded
    before they are split (their bytes may look like `<` or `,`); encoded words after."""
    readable = [v if v.isascii() and "\x1b" not in v else decode_header_value(v, defects)
                for v in values]  # fmt: skip
    return [
        (decode_header_value(name, defects), decode_header_value(addr, defects))
        for name, addr in getaddresses(readable)
        if addr
    ]


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


def _payload(part: Message) -> bytes:
    """A leaf part's content, transfer-decoded (base64, quoted-printable, uuencode)."""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _part_text(part: Message, defects: list[str]) -> str:
    payload = _payload(part)
    text, found = decode_bytes(payload, part.get_content_charset())
    defects.extend(f"{part.get_content_type()}: {d}" for d in found)
    return text.replace("\r\n", "\n").removeprefix("\ufeff")


def _params(header: str | None) -> Iterator[tuple[str, int | None, bool, str]]:
    """The parameters of a raw header value, read leniently: (name in lower case, RFC 2231
    section number, whether the value is RFC 2231 encoded, value unquoted). 8-bit bytes in a
    value stay surrogate escapes: `Message.get_param` would turn them into U+FFFD."""
    if not header:
        return
    text = unfold(";" + header)
    starts = list(PARAM_START.finditer(text))
    for i, found in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        number = int(found.group(2)[1:]) if found.group(2) else None
        value = _param_value(text[found.end() : end])
        yield found.group(1).lower(), number, bool(found.group(3)), value


def _param_value(written: str) -> str:
    """A parameter value without its quotes and trailing semicolons, as mailers really write
    it (`name="a.pdf";;`, `name=""a.pdf""`). A backslash is no escape here: it is the second
    byte of many raw Shift_JIS characters (`表`, `ソ`)."""
    return written.strip().rstrip("; \t").strip('"')


def _plain_param(header: str | None, name: str) -> str | None:
    """A plain `name=value` parameter as written (it may hold encoded words or 8-bit bytes)."""
    return next(
        (value for key, number, encoded, value in _params(header)
         if key == name and number is None and not encoded),
        None,
    )  # fmt: skip


def _extended_param(header: str | None, name: str) -> tuple[bytes, str | None] | None:
    """An RFC 2231 extended parameter (`name*=` or `name*0*=`...), read leniently: the
    percent-decoded bytes and their charset."""
    pieces = [
        (number or 0, encoded, value)
        for key, number, encoded, value in _params(header)
        if key == name and (number is not None or encoded)
    ]
    if not pieces:
        return None
    pieces.sort(key=lambda piece: piece[0])
    charset = None
    data = b""
    for number, encoded, value in pieces:
        if encoded and number == 0 and value.count("'") >= 2:
            charset, _lang, value = value.split("'", 2)
        data += unquote_to_bytes(value) if encoded else value.encode("latin-1", "replace")
    return data, charset or None


FILENAME_PARAMS = (("Content-Disposition", "filename"), ("Content-Type", "name"))


def _filename(part: Message, defects: list[str]) -> str | None:
    """The attachment's file name: RFC 2231 `filename*=` first, then a plain `filename=`
    (encoded words, raw ISO-2022-JP or raw 8-bit text), each from Content-Disposition before
    Content-Type `name=`."""
    for header, param in FILENAME_PARAMS:
        extended = _extended_param(raw_header(part, header), param)
        if extended is not None:
            text, found = decode_bytes(extended[0], extended[1] or "utf-8")
            defects.extend(f"file name: {d}" for d in found)
            return text
    for header, param in FILENAME_PARAMS:
        plain = _plain_param(raw_header(part, header), param)
        if plain is not None:
            return decode_header_value(plain, defects) or None
    return None


def _attachment_type(part: Message, filename: str | None) -> str:
    """The content type of an attachment. Without a usable Content-Type it is guessed from the
    file name, not defaulted to text/plain; a type without subtype becomes `type/unknown`."""
    declared = (raw_header(part, "Content-Type") or "").split(";")[0].strip().lower()
    if "/" in declared:
        return part.get_content_type()
    if declared and "=" not in declared:
        return f"{declared}/unknown"
    guessed = mimetypes.guess_type(filename)[0] if filename else None
    return guessed or "application/octet-stream"


def _transfer_decoded(encoded: bytes, encoding: str) -> bytes:
    """`encoded` decoded from base64 or quoted-printable, as leniently as any other part.

    The parser read the encoded text as if it were the message itself, so it comes back here
    re-serialised; base64 ignores the line breaks and quoted-printable the header layout."""
    holder = Message()
    holder["Content-Transfer-Encoding"] = encoding
    holder.set_payload(encoded.decode("ascii", "surrogateescape"))
    return _payload(holder)


def _fallback_name(ctype: str, number: int) -> str:
    extension = mimetypes.guess_extension(ctype) or ".bin"
    return f"attachment-{number}{extension}"


class _Walker:
    """Collects text, HTML and attachments from a MIME tree."""

    def __init__(self, defects: list[str]) -> None:
        self.defects = defects
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.attachments: list[MailAttachment] = []

    def walk(self, part: Message, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            self.defects.append(f"MIME nesting deeper than {MAX_DEPTH} levels not read")
            return
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            self._attach_message(part)
            return
        if part.is_multipart():
            for child in part.get_payload():
                if isinstance(child, Message):
                    self.walk(child, depth + 1)
            return
        filename = _filename(part, self.defects)
        disposition = (part.get_content_disposition() or "").lower()
        is_body = disposition != "attachment" and filename is None
        if ctype == "text/plain" and is_body:
            self.texts.append(_part_text(part, self.defects))
        elif ctype == "text/html" and is_body:
            self.htmls.append(_part_text(part, self.defects))
        elif content := _payload(part):
            ctype = _attachment_type(part, filename)
            self._add(part, ctype, filename, content, _fallback_name(ctype, self._next()))

    def _next(self) -> int:
        return len(self.attachments) + 1

    def _attach_message(self, part: Message) -> None:
        """A forwarded or bounced message is kept whole, as an .eml attachment."""
        inner = part.get_payload(0) if part.is_multipart() else None
        if not isinstance(inner, Message):
            return
        content = inner.as_bytes(policy=inner.policy.clone(linesep="\r\n"))
        encoding = (raw_header(part, "Content-Transfer-Encoding") or "").strip().lower()
        if encoding in ENCODED_TRANSFER:
            self.defects.append(f"message/rfc822 part in {encoding}: decoded")
            content = _transfer_decoded(content, encoding)
            inner = message_from_bytes(content)
        name = _filename(part, self.defects)
        subject = decode_header_value(raw_header(inner, "Subject"), self.defects)
        original = name or (f"{subject}.eml" if subject else None)
        self._add(part, "message/rfc822", original, content, f"message-{self._next()}.eml")

    def _add(
        self, part: Message, ctype: str, original: str | None, content: bytes, fallback: str
    ) -> None:
        self.attachments.append(
            MailAttachment(
                filename=sanitise_filename(original or "", fallback),
                original_filename=original,
                content_type=ctype,
                content=content,
                inline=(part.get_content_disposition() or "") == "inline",
                content_id=(raw_header(part, "Content-ID") or "").strip() or None,
            )
        )


def html_to_text(html: str) -> str:
    """Readable text from HTML: paragraphs and line breaks kept, scripts and styles dropped."""
    return "\n".join(line.rstrip() for line in get_text(html).splitlines()).strip()


def _header_text(msg: Message, name: str, defects: list[str]) -> str:
    return decode_header_value(raw_header(msg, name), defects)


def parse(raw: bytes) -> ParsedMail:
    """Parse raw message bytes. Problems are collected as defects; only non-mail raises."""
    body = raw.removeprefix(BOM)
    if not body.strip():
        raise UnreadableMail("empty message")
    parser = mailparser.parse_from_bytes(body)
    msg: Message = parser.message
    if not msg.keys():
        raise UnreadableMail("no headers found: not an email message")
    defects = [f"mime: {d}" for d in sorted(parser.defects_categories or [])]

    walker = _Walker(defects)
    walker.walk(msg)
    html = "\n".join(walker.htmls) or None
    text = "\n".join(t.strip("\n") for t in walker.texts).strip()
    if not text and html:
        text = html_to_text(html)

    senders = _addresses(raw_headers(msg, "From"), defects)
    from_name, from_email = senders[0] if senders else (None, None)
    return ParsedMail(
        message_id=next(iter(message_ids(raw_header(msg, "Message-ID"))), None),
        subject=_header_text(msg, "Subject", defects),
        from_name=from_name or None,
        from_email=from_email.lower() if from_email else None,
        to=[a for _, a in _addresses(raw_headers(msg, "To"), defects)],
        cc=[a for _, a in _addresses(raw_headers(msg, "Cc"), defects)],
        date=_date(raw_header(msg, "Date")),
        headers=[(k, decode_header_value(str(v), defects)) for k, v in msg.raw_items()],
        text=text,
        html=html,
        attachments=walker.attachments,
        in_reply_to=message_ids(raw_header(msg, "In-Reply-To")),
        references=message_ids(raw_header(msg, "References")),
        defects=list(dict.fromkeys(defects)),
    )
