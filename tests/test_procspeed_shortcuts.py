"""The shortcuts processing takes to save CPU give what the long way gives: the header block
cut before the header parser, the detect stage's reply text reused by the summary, the
cheap test before a quote pattern, the kept address checks."""

from __future__ import annotations

import random
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from ingest.detect import ORIGINAL_SEPARATOR, QUOTED_LINE, quoted_line, strip_quoted
from ingest.headers import BOM, header_block, header_end, identity_of
from ingest.parse import _address_problems, _known_address_problems, parse
from triage.summary import MAX_TEXT_CHARS, summarize

PIECES = [
    b"\r", b"\n", b"\r\n", b"Message-ID: <a@b>", b"Subject: =?utf-8?q?x?=", b"From: a@b",
    b"Date: Mon, 1 Dec 2026 00:00:00 +0900", b" folded", b"\t", b"From x", b"body line",
    b":", b"X-8bit: \xe3\x81\x82", BOM, b"--",
]  # fmt: skip


def whole_header_parse(raw: bytes) -> Message:
    """What header_block did before: the standard library's header parser on the whole mail."""
    return BytesHeaderParser(policy=compat32).parsebytes(raw.removeprefix(BOM))


def test_header_block_reads_the_fields_the_whole_mail_gives():
    rng = random.Random(17)
    for _ in range(5000):
        raw = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 16)))
        assert list(header_block(raw).raw_items()) == list(whole_header_parse(raw).raw_items()), raw


def test_header_end_is_after_the_empty_line_whatever_the_line_breaks():
    assert header_end(b"A: b\r\nC: d\r\n\r\nbody\r\n\r\n") == len(b"A: b\r\nC: d\r\n\r\n")
    assert header_end(b"A: b\n\nbody") == len(b"A: b\n\n")
    assert header_end(b"A: b\r\rbody") == len(b"A: b\r\r")
    assert header_end(b"A: b\n\r\nbody") == len(b"A: b\n\r\n")  # LF, then an empty CRLF line
    assert header_end(b"\r\nA: b") == 2  # an empty first line: no header fields
    assert header_end(b"A: b\r\n") == len(b"A: b\r\n")  # no empty line: all of it


def test_identity_is_that_of_the_whole_header_parse():
    raw = b"Message-ID: <1@x>\r\nFrom: a@b\r\nSubject: hi\r\n\r\n" + b"Subject: no\r\n" * 1000
    message_id, key = identity_of(raw, "0" * 64)
    whole = whole_header_parse(raw)
    assert message_id == "<1@x>" and whole["Subject"] == "hi"
    assert identity_of(raw + b"more body", "1" * 64) == (message_id, key)


def test_a_forwarded_message_is_named_by_its_own_subject():
    inner = b"Subject: the original\r\nFrom: c@d\r\n\n\r\nSubject: not this\r\n"
    raw = (
        b"From: a@b\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--b--\r\n"
    )
    (attachment,) = parse(raw).attachments
    assert attachment.original_filename == "the original.eml"


def test_the_summary_of_the_reply_text_is_that_of_the_text():
    quoted = "Hello,\nthe printer on floor 3 is broken again.\n\nOn Monday A wrote:\n> old news\n"
    for text in (quoted, quoted * 2, "x" * (MAX_TEXT_CHARS - 10) + "\n> tail", "> only\n"):
        expected = summarize("subject", text, {})
        assert summarize("subject", text, {}, strip_quoted(text)) == expected
    long = "> quoted\n" * (MAX_TEXT_CHARS // 9) + "the question at the end."
    assert summarize("subject", long, {}, strip_quoted(long)) == summarize("subject", long, {})


def test_quoted_line_and_the_separator_test_agree_with_their_patterns():
    lines = [
        "> a", "  > b", "\t＞c", "\u3000> wide space", "a > b", "", "no mark", "\v> v",
        "-- Original Message --", "----- 元のメッセージ -----", "- - x", "—— Forwarded message ——",
    ]  # fmt: skip
    for line in lines:
        assert quoted_line(line) == (QUOTED_LINE.match(line) is not None), line
        separator = "--" in line and ORIGINAL_SEPARATOR.match(line) is not None
        assert separator == (ORIGINAL_SEPARATOR.match(line) is not None), line


def test_a_kept_address_check_is_the_check():
    for value in ["a@b", "Name <a@b>", "<a@b", '"x" <@>', "a@b, c@d", "=?utf-8?q?x?= <a@b>"]:
        assert _known_address_problems(value) == _address_problems(value), value
        assert _known_address_problems(value) == _address_problems(value), value  # kept
