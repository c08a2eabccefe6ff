"""Raw bytes -> ParsedMail. The standard library's parser reads the MIME tree; text is decoded here.

mail-parser (4.8) leaves 7-bit ISO-2022-JP bodies undecoded, garbles CP932 characters and hands
back raw 8-bit headers as replacement characters, so header values are read undecoded
(`Message.raw_items`) and headers and text parts are decoded with `charsets.decode_bytes`.
mail-parser's own readers check the address and date headers (see `_header_checks`).

Hostile mail is read within limits (nesting, parts, lines, headers, decoded bytes, HTML); what
is cut is a defect, never an exception. Regular expressions that run on mail text are RE2 or
linear by construction (each says why), and the standard library's quadratic readers of encoded
words and parameters are replaced (`charsets.decode_words`, `_split_params`).
"""

from __future__ import annotations

import functools
import html as html_entities
import itertools
import mimetypes
import re
import unicodedata
from collections.abc import Callable, Iterator
from datetime import datetime
from email import utils as email_utils
from email.feedparser import BytesFeedParser
from email.message import Message
from email.policy import Policy, compat32
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote_to_bytes

import re2
from inscriptis.html_engine import Inscriptis
from inscriptis.model.attribute import DEFAULT_ATTRIBUTE_MAP
from inscriptis.model.config import ParserConfig
from inscriptis.model.css import CssParse
from inscriptis.model.html_element import HtmlElement
from lxml.etree import ParserError
from lxml.html import HTMLParser, document_fromstring
from mailparser.dates import parse_mail_date
from mailparser.utils import get_addresses

from ingest.charsets import CONTROL_CHARS, as_re2_text, decode_bytes
from ingest.headers import (
    BOM,
    decode_header_value,
    header_end,
    message_ids,
    raw_header,
    raw_headers,
    storable,
    unfold,
)
from ingest.mail import MailAttachment, ParsedMail

# The patterns below run on mail text with Python's `re`; each is linear by construction: a
# single character class between fixed characters, whose run stops at the next delimiter.
FILENAME_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)
# The start of each parameter in a header; values between are taken whole, so an unquoted
# RFC 2231 value with `;` or `"` inside (seen from Japanese mailers) stays in one piece.
# Linear: an attempt starts only at `;` and reads no further than the next `;`.
PARAM_START = re.compile(r";\s*([A-Za-z0-9_.-]+?)(\*\d+)?(\*)?\s*=")
# A header field or continuation line, as `email.feedparser.headerRE` reads one.
HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
ENCODED_TRANSFER = {"base64", "quoted-printable"}

# Limits on the work for one message. Real mail stays far below them; what lies beyond is
# not read, and a defect says so.
MAX_DEPTH = 32  # MIME nesting: deeper parts are one opaque leaf, not read
MAX_PARTS = 1000  # MIME parts read; the rest of the mail is not
MAX_LINES = 400_000  # lines read (25 MB of base64 is 340,000); the rest of the mail is not
MAX_HEADERS = 500  # header fields kept per part
MAX_HEADER_LINES = 5000  # lines of one header block read
MAX_ALL_HEADER_LINES = 20_000  # header lines read in all parts; the rest of the mail is not
MAX_HEADER_LENGTH = 64 * 1024  # characters kept of one header value
MAX_HEADER_TEXT = 128 * 1024  # characters of header values decoded (RFC 2047, charsets)
MAX_UNDECODED = 1000  # characters kept of a header value beyond that budget
MAX_FILENAME_SOURCE = 1024  # characters read of a file name parameter (255 bytes, encoded)
MAX_ADDRESS_TEXT = 32 * 1024  # characters of address headers read, and checked
MAX_PARAMS = 32  # parameters read of one Content-Type or Content-Disposition
MAX_DECODED = 32 * 1024 * 1024  # transfer-decoded bytes kept (intake takes 25 MB mail)
MAX_HTML_RENDER = 2 * 1024 * 1024  # characters of HTML laid out; larger HTML is tag-stripped
MAX_HTML_ELEMENTS = 10_000  # elements of HTML laid out (a newsletter has a few thousand)
MAX_DEFECTS = 100
MAX_ADDRESS_COMMENT_DEPTH = 32  # the standard library reads (nested (comments)) recursively
FEED_CHUNK = 16 * 1024  # bytes fed to the parser at once: no copy of the whole mail as text
# Bidirectional and other invisible formatting characters: U+202E makes `exe.pdf` of
# `\u202efdp.exe`. Zero-width (non-)joiners are kept: Persian and Indic names need them.
INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
KEPT_FORMAT_CHARS = {"\u200c", "\u200d"}
MAX_FILENAME_BYTES = 255  # most file systems count a name in bytes
MAX_EXTENSION = 16


class _Budget:
    """What one parse has read so far, against the limits."""

    def __init__(self) -> None:
        self.parts = 1  # the message itself
        self.dropped_parts = 0
        self.header_lines = MAX_ALL_HEADER_LINES  # what is left to read
        self.dropped_headers = 0
        self.unread = 0  # bytes of the mail not read at all
        self.cut_headers = 0
        self.parsing = True
        self.header_text = MAX_HEADER_TEXT  # what is left to decode
        self.address_text = MAX_ADDRESS_TEXT  # ... to read as addresses
        self.checked_text = MAX_ADDRESS_TEXT  # ... for mail-parser to check
        self.undecoded = False
        self.unread_addresses = False

    def decoded(self, value: str | None, defects: list[str]) -> str:
        """`decode_header_value` while the message's budget for header text lasts; beyond it a
        value is kept as written (8-bit bytes read as UTF-8), with a defect."""
        if value is None:
            return ""
        if value.isascii() and "=?" not in value and not CONTROL_CHARS.search(value):
            return " ".join(value.split())  # what decode_header_value makes of plain ASCII
        if len(value) <= self.header_text:
            self.header_text -= len(value)
            return decode_header_value(value, defects)
        self.header_text, self.undecoded = 0, True
        return " ".join(storable(value[:MAX_UNDECODED]).split())

    def addresses(self, values: list[str]) -> list[str]:
        """The address header values that fit in the message's budget for them."""
        kept = []
        for value in values:
            if len(value) > self.address_text:
                self.address_text, self.unread_addresses = 0, True
                break
            self.address_text -= len(value)
            kept.append(value)
        return kept


class _Part(Message):
    """A MIME part that keeps the standard library's parser within the limits.

    The parser asks each part for its content type to decide whether to read it as a tree:
    a part nested deeper than MAX_DEPTH answers that it is a leaf, and so does message/rfc822
    while parsing (it is kept whole, as the original bytes, so its tree is never needed).
    Parameters are read in linear time and without the exceptions of the standard library's
    reader (RFC 2231 section numbers beyond `int()`, numbered and unnumbered sections mixed).
    """

    def __init__(self, budget: _Budget, policy: Policy = compat32) -> None:
        super().__init__(policy)
        self.budget = budget
        self.depth = 0
        self.cut = False  # nested deeper than MAX_DEPTH: an opaque leaf
        self.fields = 0  # header fields kept

    def attach(self, payload: Message) -> None:  # type: ignore[override]
        assert isinstance(payload, _Part)
        payload.depth = self.depth + 1
        if self.budget.parts >= MAX_PARTS:
            payload.cut = True  # read by the parser as one leaf, then dropped
            self.budget.dropped_parts += 1
            return
        self.budget.parts += 1
        payload.cut = payload.depth > MAX_DEPTH
        super().attach(payload)

    def set_raw(self, name: str, value: Any) -> None:
        if self.fields >= MAX_HEADERS:
            self.budget.dropped_headers += 1
            return
        self.fields += 1
        if isinstance(value, str) and len(value) > MAX_HEADER_LENGTH:
            cut = value[:MAX_HEADER_LENGTH]  # at a space if there is one: no half encoded word
            value = cut.rsplit(None, 1)[0] if " " in cut[-1000:] else cut
            self.budget.cut_headers += 1
        super().set_raw(name, value)

    def get_content_type(self) -> str:
        if self.cut:
            return "application/octet-stream"
        ctype = super().get_content_type()
        if self.budget.parsing and ctype == "message/rfc822":
            return "text/plain"
        return ctype

    def get_boundary(self, failobj: Any = None) -> Any:
        try:
            return super().get_boundary(failobj)
        except (LookupError, ValueError):  # a NUL in an RFC 2231 charset
            return failobj

    def get_content_charset(self, failobj: Any = None) -> Any:
        try:
            return super().get_content_charset(failobj)
        except (LookupError, ValueError):
            return failobj

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        """Overrides `Message._get_params_preserve`, which `get_param` and `get_params` use."""
        value = self.get(header, _MISSING)
        if value is _MISSING:
            return failobj
        params = []
        for param in _split_params(str(value)):
            name, equals, val = param.partition("=")
            params.append((name.strip(), val.strip()) if equals else (param.strip(), ""))
        try:
            return email_utils.decode_params(params)
        except (ValueError, TypeError, LookupError):
            return params


_MISSING = object()


def _split_params(value: str) -> list[str]:
    """`email.message._parseparam` in linear time: the standard library's copies the rest of
    the value and recounts its quotes for every `;`, quadratic in the header length."""
    text = ";" + value
    params: list[str] = []
    pos = 0
    while pos < len(text) and text[pos] == ";" and len(params) <= MAX_PARAMS:
        start = pos + 1
        end = text.find(";", start)
        quotes, scanned = 0, start
        while end > start:  # a `;` inside quotes (not counting `\"`) is no separator
            quotes += text.count('"', scanned, end) - text.count('\\"', scanned, end)
            scanned = end
            if quotes % 2 == 0:
                break
            end = text.find(";", end + 1)
        if end < 0:
            end = len(text)
        param = text[start:end]
        if "=" in param:
            name, _, val = param.partition("=")
            param = name.strip().lower() + "=" + val.strip()
        params.append(param.strip())
        pos = end
    return params


class _FeedParser(BytesFeedParser):
    """The standard library's parser, building `_Part`s, that reads at most MAX_HEADER_LINES
    lines of a header block: its header reader costs microseconds a line."""

    def __init__(self, budget: _Budget) -> None:
        def factory(policy: Policy = compat32) -> _Part:
            return _Part(budget, policy)

        super().__init__(factory, policy=compat32)  # type: ignore[arg-type]
        self.budget = budget

    def _parse_headers(self, lines: list[str]) -> None:
        """Overrides `FeedParser._parse_headers`, which reads the lines of one header block."""
        keep = max(0, min(len(lines), MAX_HEADER_LINES, self.budget.header_lines))
        self.budget.header_lines -= keep
        self.budget.dropped_headers += len(lines) - keep
        super()._parse_headers(lines[:keep])  # type: ignore[misc]


def _with_short_header(raw: bytes, budget: _Budget) -> bytes:
    """`raw` with at most MAX_HEADER_LINES lines of header fields: the parser collects a header
    block line by line before `_FeedParser._parse_headers` can cut it. The block is cut only
    when all of its first MAX_HEADER_LINES lines are header lines; the rest up to the empty
    line is dropped."""
    ends = [(end, len(sep) // 2) for sep in (b"\n\n", b"\r\n\r\n") if (end := raw.find(sep)) >= 0]
    end, line_break = min(ends, default=(len(raw), 0))
    if raw.count(b"\n", 0, end) < MAX_HEADER_LINES:
        return raw
    cut = 0
    for _ in range(MAX_HEADER_LINES):
        line_end = raw.index(b"\n", cut) + 1
        if not HEADER_LINE.match(raw, cut, line_end):
            return raw  # the header block ends here, without an empty line
        cut = line_end
    budget.dropped_headers += raw.count(b"\n", cut, end) + 1
    return raw[:cut] + raw[end + line_break :]  # the empty line and the body


def _read_tree(raw: bytes) -> tuple[_Part, _Budget]:
    """The MIME tree of `raw`, read within the limits, and what was cut. Beyond MAX_PARTS parts,
    MAX_LINES lines or MAX_ALL_HEADER_LINES header lines the rest of the mail is not read."""
    budget = _Budget()
    raw = _with_short_header(raw, budget)
    parser = _FeedParser(budget)
    lines = 0
    for offset in range(0, len(raw), FEED_CHUNK):
        chunk = raw[offset : offset + FEED_CHUNK]
        parser.feed(chunk)
        lines += chunk.count(b"\n")
        if budget.dropped_parts or lines > MAX_LINES or budget.header_lines <= 0:
            budget.unread = len(raw) - offset - len(chunk)
            break
    root = parser.close()
    budget.parsing = False
    assert isinstance(root, _Part)
    return root, budget


class UnreadableMail(ValueError):
    """The bytes are not an email message at all."""


def _addresses(values: list[str], defects: list[str], budget: _Budget) -> list[tuple[str, str]]:
    """(display name, address) pairs, decoded. Raw ISO-2022-JP or 8-bit values are decoded
    before they are split (their bytes may look like `<` or `,`); encoded words after."""
    readable = [v if v.isascii() and "\x1b" not in v else decode_header_value(v, defects)
                for v in budget.addresses(values)]  # fmt: skip
    readable = [_shallow_comments(v, defects) for v in readable]
    return [
        (decode_header_value(name, defects), decode_header_value(addr, defects))
        for name, addr in getaddresses(readable)
        if addr
    ]


def _shallow_comments(value: str, defects: list[str]) -> str:
    """`value` without its (comments) when they nest deeper than the standard library's
    recursive address reader can follow (RecursionError)."""
    if value.count("(") <= MAX_ADDRESS_COMMENT_DEPTH:
        return value
    kept: list[str] = []
    depth = deepest = 0
    escaped = False
    for char in value:
        if depth and escaped:
            escaped = False
        elif depth and char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(char)
    if deepest <= MAX_ADDRESS_COMMENT_DEPTH:
        return value
    defects.append(f"address comments nested deeper than {MAX_ADDRESS_COMMENT_DEPTH}: removed")
    return "".join(kept)


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def sanitise_filename(name: str, fallback: str) -> str:
    """A file name safe on any file system and in any listing: no path, control characters,
    invisible formatting characters (bidi overrides such as U+202E) or reserved names, and at
    most 255 bytes of UTF-8, cut before the extension."""
    name = unicodedata.normalize("NFC", name)
    if not name.isascii():
        name = "".join(
            c for c in name
            if c.isascii() or c in KEPT_FORMAT_CHARS
            or unicodedata.category(c) not in INVISIBLE_CATEGORIES
        )  # fmt: skip
    name = PurePosixPath(name.replace("\\", "/")).name
    name = FILENAME_FORBIDDEN.sub("_", name).strip(" .")
    if not name or WINDOWS_RESERVED.match(name):
        name = f"_{name}" if name else fallback
    return _shortened(name)


def _shortened(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_FILENAME_BYTES:
        return name
    stem, dot, extension = name.rpartition(".")
    if not (dot and stem and 0 < len(extension) <= MAX_EXTENSION and " " not in extension):
        stem, extension = name, ""
    else:
        extension = "." + extension
    room = MAX_FILENAME_BYTES - len(extension.encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip(" .")
    return (stem or "_") + extension


SAFE_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")  # RFC 6838 names


def _content_type(ctype: str) -> str:
    """`ctype` if it is a plain type/subtype; its first word is taken, as a parameter may
    follow without its `;` (`text/plain\\n charset="iso-2022-jp"`)."""
    first = ctype.split(maxsplit=1)[0] if ctype.strip() else ""
    return first if SAFE_CONTENT_TYPE.fullmatch(first) else "application/octet-stream"


def _payload(part: Message) -> bytes:
    """A leaf part's content, transfer-decoded (base64, quoted-printable, uuencode)."""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _part_text(part: Message, payload: bytes, defects: list[str]) -> str:
    text, found = decode_bytes(payload, part.get_content_charset())
    defects.extend(f"{part.get_content_type()}: {d}" for d in found)
    return text.replace("\r\n", "\n").removeprefix("\ufeff")


def _params(header: str | None) -> Iterator[tuple[str, int | None, bool, str]]:
    """The parameters of a raw header value, read leniently: (name in lower case, RFC 2231
    section number, whether the value is RFC 2231 encoded, value unquoted). 8-bit bytes in a
    value stay surrogate escapes: `Message.get_param` would turn them into U+FFFD."""
    if not header:
        return
    text = ";" + (unfold(header) if "\n" in header else header)
    starts = list(itertools.islice(PARAM_START.finditer(text), MAX_PARAMS))
    for i, found in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        digits = found.group(2)[1:] if found.group(2) else None
        number = None if digits is None else int(digits) if len(digits) < 10 else 10**9
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
    data = []
    for number, encoded, value in pieces:
        if encoded and number == 0 and value.count("'") >= 2:
            charset, _lang, value = value.split("'", 2)
        written = value.encode("utf-8", "surrogateescape")  # 8-bit bytes are surrogates here
        data.append(unquote_to_bytes(written) if encoded else written)
    return b"".join(data), charset or None


FILENAME_PARAMS = (("Content-Disposition", "filename"), ("Content-Type", "name"))


def _filename(part: Message, defects: list[str], budget: _Budget) -> str | None:
    """The attachment's file name: RFC 2231 `filename*=` first, then a plain `filename=`
    (encoded words, raw ISO-2022-JP or raw 8-bit text), each from Content-Disposition before
    Content-Type `name=`."""
    for header, param in FILENAME_PARAMS:
        extended = _extended_param(raw_header(part, header), param)
        if extended is not None:
            data = extended[0][:MAX_FILENAME_SOURCE]
            if len(data) > budget.header_text:
                budget.header_text, budget.undecoded = 0, True
                return storable(data.decode("utf-8", "replace"))
            budget.header_text -= len(data)
            text, found = decode_bytes(data, extended[1] or "utf-8")
            defects.extend(f"file name: {d}" for d in found)
            return text
    for header, param in FILENAME_PARAMS:
        plain = _plain_param(raw_header(part, header), param)
        if plain is not None:
            return budget.decoded(plain[:MAX_FILENAME_SOURCE], defects) or None
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


def _fallback_name(ctype: str, number: int) -> str:
    extension = mimetypes.guess_extension(ctype) or ".bin"
    return f"attachment-{number}{extension}"


class _Walker:
    """Collects text, HTML and attachments from a MIME tree, and the parser's defects."""

    def __init__(self, defects: list[str], budget: _Budget) -> None:
        self.defects = defects
        self.budget = budget
        self.categories: set[str] = set()  # class names of the standard library's defects
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.attachments: list[MailAttachment] = []
        self.decoded = 0

    def walk(self, part: Message) -> None:
        if isinstance(part, _Part) and part.cut:
            self.defects.append(f"MIME nesting deeper than {MAX_DEPTH} levels not read")
            return
        self.categories.update(type(defect).__name__ for defect in part.defects)
        if part.get_content_type() == "message/rfc822":
            self._guarded(self._attach_message, part)
        elif part.is_multipart():
            for child in part.get_payload():
                if isinstance(child, Message):
                    self.walk(child)
        else:
            self._guarded(self._leaf, part)
        self.categories.update(type(defect).__name__ for defect in part.defects)

    def _guarded(self, read: Callable[[Message], None], part: Message) -> None:
        """One part the code below cannot read loses that part, not the whole mail."""
        try:
            read(part)
        except Exception as exc:
            ctype = _content_type(part.get_content_type())
            self.defects.append(f"{ctype}: part not read ({type(exc).__name__})")

    def _leaf(self, part: Message) -> None:
        ctype = part.get_content_type()
        filename = _filename(part, self.defects, self.budget)
        disposition = (part.get_content_disposition() or "").lower()
        is_body = disposition != "attachment" and filename is None
        if ctype in ("text/plain", "text/html") and is_body:
            payload = self._take(part)
            if payload is not None:
                text = _part_text(part, payload, self.defects)
                (self.texts if ctype == "text/plain" else self.htmls).append(text)
        elif content := self._take(part):
            ctype = _attachment_type(part, filename)
            self._add(part, ctype, filename, content, _fallback_name(ctype, self._next()))

    def _take(self, part: Message) -> bytes | None:
        """The part's decoded content, or None once MAX_DECODED bytes are taken."""
        content = _payload(part)
        if self.decoded + len(content) > MAX_DECODED:
            self.defects.append(f"parts beyond {MAX_DECODED} decoded bytes not read")
            return None
        self.decoded += len(content)
        return content

    def _next(self) -> int:
        return len(self.attachments) + 1

    def _attach_message(self, part: Message) -> None:
        """A forwarded or bounced message is kept whole, as an .eml attachment: the bytes it
        arrived in, transfer-decoded (RFC 2046 allows no base64 or quoted-printable here, but
        some mailers use them)."""
        content = self._take(part)
        if not content or not content.strip():
            return
        encoding = (raw_header(part, "Content-Transfer-Encoding") or "").strip().lower()
        if encoding in ENCODED_TRANSFER:
            self.defects.append(f"message/rfc822 part in {encoding}: decoded")
        inner, _ = _read_tree(content[: header_end(content)])
        name = _filename(part, self.defects, self.budget)
        subject = self.budget.decoded(raw_header(inner, "Subject"), self.defects)
        original = name or (f"{subject}.eml" if subject else None)
        self._add(part, "message/rfc822", original, content, f"message-{self._next()}.eml")

    def _add(
        self, part: Message, ctype: str, original: str | None, content: bytes, fallback: str
    ) -> None:
        self.attachments.append(
            MailAttachment(
                filename=sanitise_filename(original or "", fallback),
                original_filename=original,
                content_type=_content_type(ctype),
                content=content,
                inline=(part.get_content_disposition() or "") == "inline",
                content_id=storable((raw_header(part, "Content-ID") or "").strip()) or None,
            )
        )


# --- HTML -------------------------------------------------------------------------------------

XML_DECLARATION = re2.compile(r"^<\?xml [^>]+?\?>")
# For the tag-stripped fallback; linear: a run stops at the next `<` or `>`, or is one class.
LINE_BREAK_TAG = re.compile(r"(?i)<(?:br|/?p|/div|/tr|/li|/h[1-6]|/table|/blockquote)\b[^<>]*>")
TAG = re.compile(r"<[^<>]*>")
# A character reference beyond U+10FFFF; `html.unescape` makes it U+FFFD, but its int() raises
# on more than 4300 decimal digits.
HUGE_CHAR_REF = re.compile(r"&#(?:0*[1-9][0-9]{7,}|[xX]0*[1-9a-fA-F][0-9a-fA-F]{6,});?")
SPACES = re.compile(r"[ \t\r\f\v\xa0]+")
BLANK_LINES = re.compile(r" ?\n[ \n]*")  # after SPACES: one space at most before a line break
ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# inscriptis reads these from `style` attributes; lengths are checked and bounded first.
LENGTH_PROPERTIES = {
    "margin-top", "margin-bottom", "margin-before", "margin-after", "padding-left",
    "padding-start",
}  # fmt: skip
KEYWORD_PROPERTIES = {"display", "white-space", "horizontal-align", "vertical-align"}
CSS_LENGTH = re.compile(r"\s*(-?[0-9]{1,6}(?:\.[0-9]{1,6})?)\s*([a-z]+)\s*")
MAX_CSS_EM = 8  # indentation and margins beyond this many lines or columns are cut


def html_to_text(html: str, defects: list[str] | None = None) -> str:
    """Readable text from HTML: paragraphs and line breaks kept, scripts and styles dropped.

    HTML the layout engine cannot read whole is read as tag-stripped text, with a defect:
    nested deeper than libxml2's 255 levels (it drops what lies deeper, silently), larger
    than MAX_HTML_RENDER, or raising in inscriptis.
    """
    found: list[str] = [] if defects is None else defects
    text = CONTROL_CHARS.sub("", _laid_out(html, found))  # `&#1;` is a character to lxml
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def _laid_out(html: str, defects: list[str]) -> str:
    content = html.strip()
    if not content:
        return ""
    if len(content) > MAX_HTML_RENDER:
        defects.append(
            f"text/html: over {MAX_HTML_RENDER} characters: the first read as tag-stripped text"
        )
        return strip_tags(content[:MAX_HTML_RENDER])
    if content.startswith("<?xml "):
        content = XML_DECLARATION.sub("", as_re2_text(content), count=1)
    parser = HTMLParser()
    try:
        try:
            tree = document_fromstring(content, parser=parser)
        except ParserError:  # nothing but text or comments
            tree = document_fromstring("<pre>" + content + "</pre>", parser=parser)
        if any(error.type_name == "ERR_RESOURCE_LIMIT" for error in parser.error_log):
            defects.append("text/html: nested deeper than 255 levels: read as tag-stripped text")
            return strip_tags(content)
        if any(True for _ in itertools.islice(tree.iter(), MAX_HTML_ELEMENTS, None)):
            defects.append(
                f"text/html: over {MAX_HTML_ELEMENTS} elements: read as tag-stripped text"
            )
            return strip_tags(content)
        return str(Inscriptis(tree, _layout_config()).get_text())
    except Exception as exc:  # lxml or inscriptis on hostile HTML: the text is still wanted
        defects.append(f"text/html: not laid out ({type(exc).__name__}): read as tag-stripped text")
        return strip_tags(content)


def _layout_config() -> ParserConfig:
    config = ParserConfig()
    config.attribute_handler.attribute_mapping = {**DEFAULT_ATTRIBUTE_MAP, "style": _style}
    return config


def _style(style: str, element: HtmlElement) -> None:
    """inscriptis' reader of `style` attributes, given only what it can lay out. On its own it
    raises OverflowError on `padding-left: 1111...px` (400 digits), is quadratic on a long value,
    indents up to 100,000 columns, and recurses on `style: style: ...` until RecursionError."""
    kept = []
    for declaration in style.lower().split(";"):
        key, colon, value = declaration.partition(":")
        key = key.strip().replace("-webkit-", "")
        if not colon or len(value) > 64:
            continue
        if key in LENGTH_PROPERTIES:
            length = CSS_LENGTH.fullmatch(value)
            if length is None:
                continue
            number, unit = float(length.group(1)), length.group(2)
            em = number if unit in ("em", "qem", "rem") else number / 8
            kept.append(f"{key}: {max(0.0, min(em, MAX_CSS_EM)):g}em")
        elif key in KEYWORD_PROPERTIES:
            kept.append(f"{key}: {value.strip()}")
    if kept:
        CssParse.attr_style("; ".join(kept), element)


def strip_tags(html: str) -> str:
    """Text from HTML without a parser: scripts, styles, comments and tags removed, character
    references read, a line break for each paragraph, line break or table row."""
    text = _without(html, "<!--", "-->")
    text = _without(text, "<script", "</script", ">")
    text = _without(text, "<style", "</style", ">")
    text = TAG.sub("", LINE_BREAK_TAG.sub("\n", text))
    text = html_entities.unescape(HUGE_CHAR_REF.sub("\ufffd", text))
    return BLANK_LINES.sub("\n", SPACES.sub(" ", text)).strip()


def _without(text: str, opening: str, closing: str, end: str = "") -> str:
    """`text` without each span from `opening` to `closing` (and the following `end`), ASCII
    case ignored; an unclosed span is left as it is. Linear: the search only moves forward."""
    folded = text.translate(ASCII_LOWER)  # the same length, so positions stay the same
    kept, pos = [], 0
    while (start := folded.find(opening, pos)) >= 0:
        close = folded.find(closing, start + len(opening))
        if close < 0:
            break
        after = close + len(closing)
        if end:
            found = folded.find(end, after)
            after = len(text) if found < 0 else found + len(end)
        kept.append(text[pos:start])
        pos = after
    kept.append(text[pos:])
    return "".join(kept)


# --- the message ------------------------------------------------------------------------------

ADDRESS_HEADERS = {"from", "to", "cc", "bcc", "reply-to", "delivered-to"}
DATE_HEADERS = {"date", "resent-date"}
ADDRESS_CHECKS_KEPT = 1024  # address header values whose check is kept, each of at most
ADDRESS_CHECK_KEPT_CHARS = 998  # characters (a line's limit)


def _header_checks(msg: Message, budget: _Budget) -> set[str]:
    """mail-parser's findings on the address and date headers, as its defect categories.

    Its address reader is a bounded scanner that flags what a lenient reader would quietly
    accept (an invalid or ambiguous angle address, a display name that is no phrase, raw 8-bit
    bytes); its date reader flags impossible dates, times and zones and wrong weekdays. The
    values themselves are read by the code above (it must accept `MAILER-DAEMON` without a
    domain for bounce detection, which mail-parser rejects)."""
    found = set()
    for name, raw in msg.raw_items():
        key = name.lower()
        if key not in ADDRESS_HEADERS and key not in DATE_HEADERS:
            continue
        # Raw UTF-8 (RFC 6532) is text to mail-parser; only bytes that are not UTF-8 stay
        # surrogates, which it reports as `invalid-utf8`.
        value = str(raw).encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
        try:
            if key in ADDRESS_HEADERS:
                if len(value) > budget.checked_text:
                    budget.checked_text, budget.unread_addresses = 0, True
                    continue
                budget.checked_text -= len(value)
                short = len(value) <= ADDRESS_CHECK_KEPT_CHARS
                if (_known_address_problems if short else _address_problems)(value):
                    found.add("AddressHeaderDefect")
            elif key in DATE_HEADERS and parse_mail_date(value).reasons:
                found.add("DateHeaderDefect")
        except Exception:  # a checker failing on a header is a finding too
            found.add("AddressHeaderDefect" if key in ADDRESS_HEADERS else "DateHeaderDefect")
    return found


def _address_problems(value: str) -> bool:
    """Whether mail-parser's address reader finds a problem in an address header value."""
    problems: list[dict[str, Any]] = []
    get_addresses(value, defects=problems, decode_names=True)
    return bool(problems)


# The reader costs a tenth of a millisecond a value, and most mail names the same few
# addresses (the service's own in To): its findings for the last values seen are kept.
_known_address_problems = functools.lru_cache(maxsize=ADDRESS_CHECKS_KEPT)(_address_problems)


def _cut(budget: _Budget) -> list[str]:
    cut = []
    if budget.dropped_parts:
        cut.append(f"MIME parts beyond the first {MAX_PARTS} not read ({budget.dropped_parts})")
    if budget.dropped_headers:
        cut.append(
            f"header fields beyond {MAX_HEADERS} ({MAX_HEADER_LINES} lines) in a part not read"
        )
    if budget.unread:
        cut.append(f"mail beyond the limits not read ({budget.unread} bytes)")
    if budget.cut_headers:
        cut.append(f"header values cut at {MAX_HEADER_LENGTH} characters")
    if budget.undecoded:
        cut.append(f"header text beyond {MAX_HEADER_TEXT} characters not decoded")
    if budget.unread_addresses:
        cut.append(f"address headers beyond {MAX_ADDRESS_TEXT} characters not read")
    return cut


def _listed(defects: list[str]) -> list[str]:
    """Defects once each, printable, at most MAX_DEFECTS."""
    unique = list(
        dict.fromkeys(
            d if d.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in d)
            for d in defects
        )
    )
    if len(unique) > MAX_DEFECTS:
        more = len(unique) - MAX_DEFECTS + 1
        unique = [*unique[: MAX_DEFECTS - 1], f"{more} more defects not listed"]
    return unique


def parse(raw: bytes) -> ParsedMail:
    """Parse raw message bytes. Problems are collected as defects; only non-mail raises."""
    body = raw.removeprefix(BOM)
    if not body.strip():
        raise UnreadableMail("empty message")
    msg, budget = _read_tree(body)
    if not msg.keys():
        raise UnreadableMail("no headers found: not an email message")
    found: list[str] = []
    walker = _Walker(found, budget)
    walker.walk(msg)
    categories = walker.categories | _header_checks(msg, budget)
    defects = [f"mime: {d}" for d in sorted(categories)] + found
    html = "\n".join(walker.htmls) or None
    text = "\n".join(t.strip("\n") for t in walker.texts).strip()
    if not text and html:
        text = html_to_text(html, defects)

    headers = [(k, budget.decoded(str(v), defects)) for k, v in msg.raw_items()]
    senders = _addresses(raw_headers(msg, "From"), defects, budget)
    from_name, from_email = senders[0] if senders else (None, None)
    parsed = ParsedMail(
        message_id=next(iter(message_ids(raw_header(msg, "Message-ID"))), None),
        subject=next((v for k, v in headers if k.lower() == "subject"), ""),
        from_name=from_name or None,
        from_email=from_email.lower() if from_email else None,
        to=[a for _, a in _addresses(raw_headers(msg, "To"), defects, budget)],
        cc=[a for _, a in _addresses(raw_headers(msg, "Cc"), defects, budget)],
        date=_date(raw_header(msg, "Date")),
        headers=headers,
        text=text,
        html=html,
        attachments=walker.attachments,
        in_reply_to=message_ids(raw_header(msg, "In-Reply-To")),
        references=message_ids(raw_header(msg, "References")),
    )
    parsed.defects = _listed(defects + _cut(budget))
    return parsed
