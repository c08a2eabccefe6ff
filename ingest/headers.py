"""Header reads, from raw bytes or a parsed part: the one home of the Message-ID pattern, the
dedupe key and header decoding. SMTP (for its log line), intake (for the ledger row), IMAP (for
messages it cannot fetch) and the admin tools (for failed rows) read headers only through here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from ingest.charsets import CONTROL_CHARS, decode_bytes, decode_words

# `<left@right>`; no white space, angle brackets or control characters inside. Python's `re`
# (RE2 cannot read raw 8-bit header text): linear by construction, one character class between
# fixed delimiters, whose run stops at the next `<` or `>`.
MESSAGE_ID = re.compile(r"<[^<>\s\x00-\x1f\x7f]+>")
# A folded header line continues after CRLF + whitespace; unfolded before decoding.
FOLDING = re.compile(r"\r?\n[ \t]")
BOM = b"\xef\xbb\xbf"
IDENTITY_HEADERS = ("From", "Date", "Subject")


def unfold(value: str) -> str:
    return FOLDING.sub(" ", value)


def header_block(raw: bytes) -> Message:
    """The header fields of `raw` (body not read); works on any bytes, values stay undecoded.
    Only the bytes up to `header_end` are given to the parser: it reads the rest line by line
    even when told to read only the headers (most of the cost of intake's `identity_of`)."""
    body = raw.removeprefix(BOM)
    return BytesHeaderParser(policy=compat32).parsebytes(body[: header_end(body)])


def header_end(raw: bytes) -> int:
    """Where the header block of `raw` ends: after the empty line that closes it, with line
    breaks CRLF, LF or CR as the standard library's parser reads them; else len(raw). Two line
    breaks in a row are two break characters in a row other than CRLF's own pair."""
    if raw[:1] in (b"\r", b"\n"):
        return 2 if raw.startswith(b"\r\n") else 1  # the first line is empty: no fields
    first = len(raw)  # where the earliest pair found starts; each next looked for before it
    for pair in (b"\n\n", b"\n\r", b"\r\r"):
        found = raw.find(pair, 0, first + 1)
        first = found if found >= 0 else first
    if first == len(raw):
        return first
    start = first + 1  # the second line break of the pair
    return start + (2 if raw.startswith(b"\r\n", start) else 1)


def message_ids(value: str | None) -> list[str]:
    """Every `<id>` in a Message-ID, In-Reply-To or References value, as stored (`storable`)."""
    return [storable(found) for found in MESSAGE_ID.findall(value or "")]


def first_message_id(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    found = message_ids(value)
    return found[0] if found else None


def storable(text: str) -> str:
    """Raw header text as text a database takes: 8-bit bytes read as UTF-8 (U+FFFD where they
    are not), control characters removed."""
    if not text.isascii():
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return CONTROL_CHARS.sub("", text)


def identity_of(raw: bytes, sha256: str) -> tuple[str | None, str]:
    """The Message-ID and the dedupe key of a message, from its header block only.

    Two deliveries are the same message when Message-ID, From, Date and Subject agree (relays
    add trace headers, so the bytes differ); without a Message-ID, when the bytes are identical.
    Comparing more than the Message-ID keeps distinct mails from mailers that reuse one.
    """
    headers = header_block(raw)
    message_id = first_message_id(str(headers.get("Message-ID") or ""))
    if message_id is None:
        return None, f"sha256:{sha256}"
    # `get` (not the raw value) as when the first keys were stored: the key must never change.
    identity = "\n".join(
        [message_id, *(" ".join(str(headers.get(h) or "").split()) for h in IDENTITY_HEADERS)]
    )
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()
    return message_id, f"mid:{digest}"


def message_id_as_written(raw: bytes) -> str:
    """The Message-ID header as written, for log lines (the ledger keeps the normalised one)."""
    value = raw_header(header_block(raw), "Message-ID")
    return storable(" ".join(value.split())) if value else "(no Message-ID)"


def decoded_headers(raw: bytes) -> list[tuple[str, str]]:
    """The decoded header fields of `raw`; works on messages the full parser gives up on."""
    defects: list[str] = []
    block = header_block(raw)
    return [(name, decode_header_value(str(value), defects)) for name, value in block.raw_items()]


def first_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers if key.lower() == wanted), None)


def decode_header_value(value: str | None, defects: list[str]) -> str:
    """Decode RFC 2047 encoded words and raw 8-bit bytes (kept as surrogates) in one value.

    Adjacent encoded words in one charset are joined before decoding, so a character split
    across two words (common in Japanese subjects) comes out whole.
    """
    if value is None:
        return ""
    value = unfold(str(value))
    chunks = decode_words(value, defects)
    parts = []
    for chunk, charset in chunks:
        raw = _chunk_bytes(chunk, charset, eight_bit=not value.isascii())
        text, found = decode_bytes(raw, charset)
        defects.extend(f"header: {d}" for d in found)
        parts.append(text)
    return " ".join("".join(parts).split())


def _chunk_bytes(chunk: bytes | str, charset: str | None, eight_bit: bool) -> bytes:
    """The bytes of one `decode_header` chunk. Beside encoded words, `decode_header` returns the
    other text as `raw-unicode-escape` bytes, in which a raw 8-bit byte (kept as a surrogate)
    reads `\\udce3`: that is undone here. Only for values with 8-bit text, so that a literal
    `\\u` in an ASCII header stays as written."""
    if isinstance(chunk, str):
        return chunk.encode("utf-8", "surrogateescape")
    if charset is None and eight_bit:
        return chunk.decode("raw-unicode-escape").encode("utf-8", "surrogateescape")
    return chunk


def raw_header(part: Message, name: str) -> str | None:
    """The undecoded value of header `name`; 8-bit bytes stay as surrogate escapes.

    `Message.get` would turn such a value into an `email.header.Header` whose text has lost them.
    """
    wanted = name.lower()
    return next((str(v) for k, v in part.raw_items() if k.lower() == wanted), None)


def raw_headers(part: Message, name: str) -> list[str]:
    wanted = name.lower()
    return [str(v) for k, v in part.raw_items() if k.lower() == wanted]
