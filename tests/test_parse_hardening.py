"""Hostile and broken mail: every input parses to a ParsedMail with defects, within bounds.

Each test here failed before the parser was hardened: an exception escaped, the work was
unbounded, or text was lost without a defect.
"""

from __future__ import annotations

import base64
import os

import mailparser
import pytest

from ingest import parse as parse_module
from ingest.mail import ParsedMail
from ingest.parse import MAX_DEPTH, MAX_HEADERS, MAX_PARTS, parse, sanitise_filename
from tests.hostile.bounds import assert_no_safety_net, assert_storable, bounded

HEADERS = "From: a@example.jp\nTo: b@example.jp\nSubject: x\nMIME-Version: 1.0\n"
# Generous bounds on the work for one hostile input; a parse that needs more is stopped.
CPU_SECONDS = 2.0
BIG_CPU_SECONDS = 10.0  # for the inputs of several megabytes below


def mail(headers: bytes | str, body: bytes = b"body\n") -> bytes:
    if isinstance(headers, str):
        headers = headers.encode()
    return headers.rstrip(b"\n") + b"\n\n" + body


def read(raw: bytes, cpu_seconds: float = CPU_SECONDS) -> ParsedMail:
    """`parse(raw)` within the CPU bound; the result must be storable and need no catch-all."""
    with bounded(cpu_seconds):
        parsed = parse(raw)
    assert_storable(parsed)
    assert_no_safety_net(parsed)
    return parsed


def multipart(parts: list[bytes], boundary: str = "b") -> bytes:
    body = b"".join(f"--{boundary}\n".encode() + part + b"\n" for part in parts)
    return mail(
        HEADERS + f'Content-Type: multipart/mixed; boundary="{boundary}"',
        body + f"--{boundary}--\n".encode(),
    )


# --- exceptions that escaped the parser -------------------------------------------------------


def test_an_invalid_base64_encoded_word_is_kept_as_written_with_a_defect():
    """`email.header.decode_header` raised HeaderParseError for the whole header."""
    parsed = read(mail("From: a@example.jp\nSubject: =?utf-8?B?A?= and more"))
    assert parsed.subject == "=?utf-8?B?A?= and more"
    assert "malformed encoded word in header: '=?utf-8?B?A?= and more'" in parsed.defects


def test_corrupt_iso2022jp_becomes_replacement_characters_with_a_defect():
    """A JIS X 0208 byte followed by 0xFF raised ValueError in `_jis_pair_to_sjis`."""
    body = "在庫".encode("iso2022_jp") + b'\x1b$B"\xff\x1b(B end\n'
    parsed = read(mail(HEADERS + "Content-Type: text/plain; charset=iso-2022-jp", body))
    assert parsed.text.startswith("在庫\ufffd")
    assert parsed.text.endswith(" end")
    assert "text/plain: ISO-2022-JP with undecodable bytes replaced" in parsed.defects


def test_a_truncated_iso2022jp_character_becomes_a_replacement_character():
    parsed = read(mail(HEADERS, b"\x1b$B$3$s$\n"))
    assert parsed.text == "こん\ufffd"


def test_charset_undefined_with_8bit_bytes_is_guessed_with_a_defect():
    """Python's `undefined` codec raises a bare UnicodeError for any byte."""
    body = "こんにちは".encode()
    parsed = read(mail(HEADERS + "Content-Type: text/plain; charset=undefined", body))
    assert parsed.text == "こんにちは"
    assert "text/plain: 8-bit text labelled undefined: decoded as utf-8" in parsed.defects


@pytest.mark.parametrize(
    "headers",
    [
        b"From: a@example.jp\nSubject: =?\xe3\x81?B?" + base64.b64encode("見積".encode()) + b"?=",
        HEADERS.encode() + b"Content-Type: application/pdf\n"
        b"Content-Disposition: attachment; filename*=\xe3\x81''%E8%A6%8B%E7%A9%8D.pdf",
    ],
    ids=["encoded word", "RFC 2231 file name"],
)
def test_a_charset_label_with_8bit_bytes_names_no_charset(headers):
    """`codecs.lookup` raised UnicodeEncodeError on the raw 8-bit bytes of the label."""
    parsed = read(mail(headers, b"%PDF-1.4\n"))
    assert "見積" in parsed.subject + "".join(a.filename for a in parsed.attachments)
    assert any("labelled \\xe3\\x81: decoded as utf-8" in d for d in parsed.defects)


@pytest.mark.parametrize(
    "subject",
    [b"=?utf\x00-8?Q?ab?=", b"=?utf-8*ja\x00?B?YWI=?=", b"=?\x00?Q?ab?="],
    ids=["in charset", "in language", "charset only NUL"],
)
def test_nul_inside_an_encoded_word(subject):
    """`codecs.lookup` raised ValueError (embedded null character)."""
    parsed = read(mail(b"From: a@example.jp\nSubject: " + subject))
    assert parsed.subject == "ab"


def test_ten_thousand_levels_of_nesting_are_cut_at_the_limit():
    """The standard library's parser recursed once per level (MailParserRecursionError)."""
    raw = HEADERS.encode() + b'Content-Type: multipart/mixed; boundary="b0"\n\n'
    raw += b"--b0\nContent-Type: text/plain\n\nouter text\n"
    for level in range(10_000):
        raw += f'--b{level}\nContent-Type: multipart/mixed; boundary="b{level + 1}"\n\n'.encode()
    raw += b"--b10000\nContent-Type: text/plain\n\ninnermost\n"
    parsed = read(raw)
    assert parsed.text == "outer text"
    assert f"MIME nesting deeper than {MAX_DEPTH} levels not read" in parsed.defects


# --- bounded work -----------------------------------------------------------------------------


def test_a_mail_of_100000_parts_reads_the_first_parts_within_bounds():
    """10.9 MB in 100,000 parts took 170 s."""
    parts = [b"Content-Type: text/plain\n\npart %d " % n + b"x" * 70 for n in range(100_000)]
    raw = multipart(parts)
    assert len(raw) > 10_000_000
    parsed = read(raw, BIG_CPU_SECONDS)
    assert parsed.text.startswith("part 0 ")
    assert f"part {MAX_PARTS - 2} " in parsed.text
    assert f"part {MAX_PARTS} " not in parsed.text
    assert any(
        d.startswith(f"MIME parts beyond the first {MAX_PARTS} not read") for d in parsed.defects
    )


def test_decoded_content_beyond_the_limit_is_not_kept(monkeypatch):
    monkeypatch.setattr(parse_module, "MAX_DECODED", 1000)
    attachment = b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    raw = multipart([attachment + base64.encodebytes(bytes(600)) for _ in range(3)])
    parsed = read(raw)
    assert [len(a.content) for a in parsed.attachments] == [600]
    assert "parts beyond 1000 decoded bytes not read" in parsed.defects


def test_header_fields_beyond_the_limit_are_not_kept():
    fields = "".join(f"X-Field-{n}: {n}\n" for n in range(MAX_HEADERS + 100))
    parsed = read(mail("From: a@example.jp\nSubject: many fields\n" + fields))
    assert len(parsed.headers) == MAX_HEADERS
    assert parsed.subject == "many fields"
    assert any(d.startswith(f"header fields beyond {MAX_HEADERS}") for d in parsed.defects)


def test_a_header_block_of_a_million_lines_is_read_within_bounds():
    raw = mail("From: a@example.jp\nSubject: long\n" + "X-A: b\n" * 1_000_000, b"the body\n")
    parsed = read(raw, BIG_CPU_SECONDS)
    assert (parsed.subject, parsed.text) == ("long", "the body")
    assert any(d.startswith("header fields beyond") for d in parsed.defects)


@pytest.mark.slow
def test_a_25_mb_mail_is_read_in_reasonable_memory():
    """mail-parser's discarded parse base64-encoded every attachment again: 356 MB at peak."""
    content = os.urandom(18 * 1024 * 1024)
    attachment = b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    raw = multipart(
        [b"Content-Type: text/plain\n\nsee attached", attachment + base64.encodebytes(content)]
    )
    assert len(raw) > 24_000_000
    with bounded(BIG_CPU_SECONDS, measure_memory=True) as usage:
        parsed = parse(raw)
    assert parsed.attachments[0].content == content
    assert usage.peak < 8 * len(raw)


def test_headers_that_make_the_standard_library_quadratic_are_read_within_bounds():
    """Its encoded-word search backtracks, its parameter reader copies the value and counts its
    quotes again at each `;`, its address reader recurses into (comments)."""
    read(mail("From: a@example.jp\nSubject: " + "=?a?q? " * 9000))
    read(mail('From: a@example.jp\nContent-Type: text/plain; a="' + ";" * 60_000))
    read(mail("From: a@example.jp\n" + ("To: " + '"a" <b@example.jp>, ' * 3000 + "\n") * 30))
    name = b"Content-Disposition: attachment; filename=" + b"=?utf-8?q?a?= " * 4000
    read(multipart([b"Content-Type: application/pdf\n" + name + b"\n\n%PDF"] * 100))


def test_the_discarded_full_parse_of_mail_parser_is_not_run(monkeypatch):
    """mail-parser's constructor walked and decoded every part again, and its result was thrown
    away: 45-60 % of the parse time on the shared corpus."""

    def full_parse(self: object) -> None:
        raise AssertionError("MailParser.parse ran")

    monkeypatch.setattr(mailparser.MailParser, "parse", full_parse)
    parsed = read(mail(HEADERS + "Date: Mon, 32 Jan 2026 25:00:00 +0900", b"text\n"))
    assert parsed.text == "text"
    assert "mime: DateHeaderDefect" in parsed.defects  # mail-parser's date check still runs


# --- HTML -------------------------------------------------------------------------------------


def test_html_nested_deeper_than_255_levels_is_read_as_tag_stripped_text():
    """lxml stops at 255 levels and drops the rest: the text vanished without a defect."""
    body = b"<html><body><p>Hello</p>" + b"<div>" * 300 + b"deep text" + b"</div>" * 300
    parsed = read(mail(HEADERS + "Content-Type: text/html; charset=utf-8", body))
    assert parsed.text == "Hello\ndeep text"
    assert "text/html: nested deeper than 255 levels: read as tag-stripped text" in parsed.defects


@pytest.mark.parametrize(
    "style",
    ["padding-left: " + "1" * 400 + "px", "style: " * 2000 + "display: none"],
    ids=["OverflowError", "RecursionError"],
)
def test_css_that_breaks_the_html_layout_engine_is_ignored(style):
    body = f'<p style="{style}">Hello</p><p>world</p>'.encode()
    parsed = read(mail(HEADERS + "Content-Type: text/html", body))
    assert parsed.text == "Hello\n\nworld"


# --- file names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("invoice\u202efdp.exe", "invoicefdp.exe"),  # shown as invoiceexe.pdf
        ("\u2067見積\u2069\u200e.pdf", "見積.pdf"),
        ("a\u200db\ufeff.txt", "a\u200db.txt"),  # a zero-width joiner is part of the name
        ("report\u0085\u2028.pdf", "report.pdf"),
    ],
)
def test_bidi_controls_and_invisible_characters_are_removed_from_file_names(name, safe):
    assert sanitise_filename(name, "fallback.bin") == safe


@pytest.mark.parametrize(
    ("name", "extension"),
    [
        ("見積書" * 100 + ".pdf", ".pdf"),
        ("a" * 300 + ".tar.gz", ".gz"),
        ("b" * 200 + "ü" * 100, "ü"),
    ],
)
def test_a_long_file_name_is_cut_to_255_bytes_before_its_extension(name, extension):
    safe = sanitise_filename(name, "fallback.bin")
    assert len(safe.encode()) <= 255
    assert safe.endswith(extension)
    assert safe[:10] == name[:10]


# --- further exceptions found on the way ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "defect"),
    [
        (  # int() of a 5000-digit RFC 2231 section number
            mail(HEADERS + "Content-Type: text/plain; charset*" + "9" * 5000 + "=x"),
            None,
        ),
        (  # sorting sections None and 0
            mail(HEADERS + "Content-Type: text/plain; charset*=x; charset*0=y"),
            None,
        ),
        (  # a NUL in the charset of an RFC 2231 boundary, read by the parser itself
            mail(
                b"From: a@example.jp\nContent-Type: multipart/mixed; boundary*=a\x00b''b",
                b"--b\n\nx\n--b--\n",
            ),
            "mime: NoBoundaryInMultipartDefect",
        ),
        (  # timedelta() of a zone offset beyond a C int
            mail(HEADERS + "Date: Mon, 1 Jan 2024 00:00:00 +99999999999999999999999"),
            "mime: DateHeaderDefect",
        ),
        (  # RecursionError in email.utils.getaddresses
            mail("From: " + "(" * 3000 + "a@example.jp"),
            "address comments nested deeper than 32: removed",
        ),
        (  # lone surrogates from UTF-7, which no database stores
            mail(HEADERS + "Content-Type: text/plain; charset=utf-7", b"+2D0-\n"),
            "text/plain: lone surrogates replaced",
        ),
    ],
    ids=[
        "section number",
        "mixed sections",
        "NUL in boundary",
        "date overflow",
        "nested comments",
        "UTF-7 surrogate",
    ],
)
def test_inputs_that_raised_parse_with_a_defect(raw, defect):
    parsed = read(raw)
    if defect:
        assert defect in parsed.defects


def test_raw_8bit_bytes_in_ids_and_content_types_are_stored_as_text():
    raw = multipart(
        [b"Content-Type: te\xffxt/plain\nContent-ID: <\xe3\x81\x82\x00@x>\n\nbody"],
    ).replace(b"Subject: x", b"Subject: x\nMessage-ID: <\xe3\x81\x82@example.jp>")
    parsed = read(raw)
    assert parsed.message_id == "<あ@example.jp>"
    assert [(a.content_type, a.content_id) for a in parsed.attachments] == [
        ("application/octet-stream", "<あ@x>")
    ]


@pytest.mark.parametrize("encoded", [True, False], ids=["name*1*", "name*1"])
def test_an_rfc2231_continuation_with_raw_8bit_bytes_keeps_its_part(encoded):
    """`name*1*=` written as raw UTF-8 instead of %-escapes: the body and the name are read
    (the continuation's bytes were lost to an encoding error, and the part with them)."""
    star = b"*" if encoded else b""
    raw = (
        b"From: a@example.jp\nSubject: x\nMIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8; name*0*=utf-8''%E8%A6%8B; name*1" + star + b"="
        + "積書.txt".encode() + b"\nContent-Disposition: attachment\n\n"
        + "在庫あり".encode() + b"\n"
    )  # fmt: skip
    parsed = parse(raw)
    assert_no_safety_net(parsed)
    assert [a.filename for a in parsed.attachments] == ["見積書.txt"]
