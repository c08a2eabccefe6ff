"""No input makes `ingest.parse.parse` raise (except UnreadableMail for bytes that are no mail),
exceed its per-input bounds, or return text a database refuses.

Hypothesis builds MIME trees, headers, charsets and transfer encodings, well-formed and broken;
a seeded byte-mutation run corrupts the mails of tests/data. Both are deterministic
(`derandomize`, a fixed seed) and short.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.mail import ParsedMail
from ingest.parse import UnreadableMail, parse
from tests.conftest import DATA
from tests.hostile.bounds import assert_no_safety_net, assert_storable, bounded

CPU_SECONDS = 2.0  # per input; a parse that needs more is stopped
MEMORY = 100 * 1024 * 1024  # peak of Python's allocations per input
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(raw: bytes, measure_memory: bool = True) -> ParsedMail | None:
    """Parse `raw` within the bounds; None if it is no mail at all."""
    with bounded(CPU_SECONDS, measure_memory) as usage:
        try:
            parsed = parse(raw)
        except UnreadableMail:
            parsed = None
    assert usage.peak < MEMORY
    if parsed is not None:
        assert_storable(parsed)
        assert_no_safety_net(parsed)
    return parsed


# --- strategies -------------------------------------------------------------------------------

CHARSETS = [
    "utf-8", "iso-2022-jp", "shift_jis", "euc-jp", "cp932", "iso-8859-1", "windows-1252",
    "us-ascii", "utf-7", "utf-16", "gb2312", "big5", "koi8-r", "ks_c_5601-1987",
    "undefined", "unicode-escape", "idna", "punycode", "hex", "rot13", "x-unknown",
    "unknown-8bit", "", "utf\x00-8", "\udce3\udc81\udc82", "\udcff", '"utf-8"', "utf-8'ja'",
]  # fmt: skip
# Codecs that text is written in; a label may then name another one.
WRITTEN = ["utf-8", "iso2022_jp", "cp932", "euc_jp", "cp1252", "utf-7", "utf-16", "gb18030"]
TRANSFER_ENCODINGS = [
    "7bit",
    "8bit",
    "binary",
    "base64",
    "quoted-printable",
    "x-uuencode",
    "x-junk",
    "",
]
NASTY = [
    b"\x00", b"\x1b$B", b"\x1b(B", b'\x1b$B"\xff', b"\xff", b"\x80", b"\r", b"\n", b"\r\n", b"\t",
    b"=?", b"?=", b"=?utf-8?B?A?=", b"=?\x00?Q?a?=", b";", b'"', b"\\", b"(", b")", b"<", b">",
    b"--", b"*0*=", b"''", b"%", b"=", b"\xe2\x80\xae",
]  # fmt: skip

texts = st.text(max_size=120)
nasty_bytes = st.lists(st.one_of(st.sampled_from(NASTY), st.binary(max_size=12)), max_size=12).map(
    b"".join
)


@st.composite
def written_text(draw: st.DrawFn) -> bytes:
    """Text in some codec, or bytes no codec wrote."""
    if draw(st.booleans()):
        return draw(nasty_bytes)
    codec = draw(st.sampled_from(WRITTEN))
    return draw(texts).encode(codec, "replace")


def label(charset: str) -> bytes:
    return charset.encode("utf-8", "surrogateescape")


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    charset = label(draw(st.sampled_from(CHARSETS)))
    data = draw(written_text())
    if draw(st.booleans()):
        payload = base64.b64encode(data)
        if draw(st.booleans()):
            payload = payload[: draw(st.integers(0, len(payload)))]  # broken padding
        return b"=?" + charset + b"?B?" + payload + b"?="
    return b"=?" + charset + b"?Q?" + quopri.encodestring(data, header=True) + b"?="


header_values = st.lists(
    st.one_of(encoded_words(), written_text(), st.sampled_from(NASTY)), max_size=6
).map(b" ".join)


@st.composite
def address_values(draw: st.DrawFn) -> bytes:
    name = draw(st.one_of(encoded_words(), written_text(), st.just(b'"a, b" ')))
    comment = draw(st.sampled_from([b"", b"(c)", b"(" * 40 + b"x" + b")" * 40, b"((("]))
    address = draw(st.sampled_from([b"a@example.jp", b"MAILER-DAEMON", b"", b"a@@b", b"\xe3@x"]))
    addresses = name + b" " + comment + b" <" + address + b">"
    return b", ".join([addresses] * draw(st.integers(1, 3)))


dates = st.one_of(
    st.sampled_from(
        [
            b"Mon, 24 Nov 2026 10:00:00 +0900",
            b"Mon, 32 Jan 2026 25:61:61 +9999",
            b"Mon, 1 Jan 2024 00:00:00 +99999999999999999999999",
            b"1 Jan 99999999999999 00:00:00 GMT",
            b"",
        ]
    ),
    written_text(),
)

FIELD_NAMES = [
    b"Subject", b"Message-ID", b"In-Reply-To", b"References", b"X-Note", b"Content-ID",
    b"Auto-Submitted", b"List-Id", b"X-\xff",
]  # fmt: skip


@st.composite
def top_headers(draw: st.DrawFn) -> bytes:
    fields = [b"From: " + draw(address_values())]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "address", "date"]))
        if kind == "address":
            fields.append(
                draw(st.sampled_from([b"To", b"Cc", b"Reply-To"])) + b": " + draw(address_values())
            )
        elif kind == "date":
            fields.append(b"Date: " + draw(dates))
        else:
            fields.append(draw(st.sampled_from(FIELD_NAMES)) + b": " + draw(header_values))
    return b"\n".join(fields)


def transfer_encoded(data: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.encodebytes(data)
    if encoding == "quoted-printable":
        return quopri.encodestring(data)
    if encoding == "x-uuencode":
        lines = [binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45)]
        return b"begin 644 file.bin\n" + b"".join(lines) + b"`\nend\n"
    return data


@st.composite
def content_params(draw: st.DrawFn) -> bytes:
    params = [b"charset=" + label(draw(st.sampled_from(CHARSETS)))]
    name = draw(st.one_of(st.none(), encoded_words(), written_text()))
    if name is not None:
        params.append(
            draw(
                st.sampled_from(
                    [
                        b'name="' + name + b'"',
                        b"name*=utf-8''" + name.hex().encode(),
                        b"name*0*=" + label(draw(st.sampled_from(CHARSETS))) + b"''%E8%A6%8B;"
                        b" name*1*=" + name[:20],
                        b"name*=x; name*0=y",
                        b"name*" + b"9" * 5000 + b"=x",
                    ]
                )
            )
        )
    return b"; ".join(params)


CONTENT_TYPES = [
    b"text/plain", b"text/html", b"application/pdf", b"image/png", b"text", b"te\xffxt/plain",
    b"message/rfc822", b"message/delivery-status", b"application/octet-stream",
]  # fmt: skip


@st.composite
def leaves(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    encoding = draw(st.sampled_from(TRANSFER_ENCODINGS))
    if ctype == b"text/html":
        body = b"<p style='padding-left: " + b"9" * draw(st.integers(1, 400)) + b"px'>"
        body += draw(written_text()) + b"</p>" + b"<div>" * draw(st.sampled_from([0, 3, 300]))
    elif ctype == b"message/rfc822":
        body = draw(top_headers()) + b"\n\n" + draw(written_text())
    else:
        body = draw(written_text())
    headers = [b"Content-Type: " + ctype + b"; " + draw(content_params())]
    if encoding:
        headers.append(b"Content-Transfer-Encoding: " + encoding.encode())
    if draw(st.booleans()):
        disposition = draw(st.sampled_from([b"attachment", b"inline", b"\xff"]))
        headers.append(
            b"Content-Disposition: " + disposition + b"; filename=" + draw(header_values)
        )
    return b"\n".join(headers) + b"\n\n" + transfer_encoded(body, encoding)


@st.composite
def multiparts(draw: st.DrawFn, children: st.SearchStrategy[bytes]) -> bytes:
    boundary = draw(st.sampled_from([b"b", b"=_x", b"a b", b"", b"\xff", b"--"])) + draw(
        st.sampled_from([b"1", b"2", b"3"])
    )
    subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related", b"digest", b"report"]))
    parts = draw(st.lists(children, min_size=0, max_size=4))
    body = draw(st.sampled_from([b"", b"preamble\n"]))
    body += b"".join(b"--" + boundary + b"\n" + part + b"\n" for part in parts)
    if draw(st.booleans()):
        body += b"--" + boundary + b"--\n" + draw(st.sampled_from([b"", b"epilogue\n"]))
    param = draw(st.sampled_from([b'boundary="%s"', b"boundary=%s", b"boundary*=utf-8''%s", b""]))
    if b"%s" in param:
        param = param.replace(b"%s", boundary)
    return b"Content-Type: multipart/" + subtype + b"; " + param + b"\n\n" + body


mime_trees = st.recursive(leaves(), lambda children: multiparts(children), max_leaves=8)


@st.composite
def mails(draw: st.DrawFn) -> bytes:
    raw = draw(top_headers()) + b"\nMIME-Version: 1.0\n" + draw(mime_trees)
    return raw.replace(b"\n", b"\r\n") if draw(st.booleans()) else raw


# --- properties -------------------------------------------------------------------------------


@FUZZ
@given(mails())
def test_mime_trees_parse_within_bounds(raw):
    assert check(raw) is not None


@FUZZ
@given(top_headers(), written_text())
def test_headers_parse_within_bounds(headers, body):
    assert check(headers + b"\n\n" + body) is not None


@FUZZ
@given(st.sampled_from(CHARSETS), written_text(), st.sampled_from(TRANSFER_ENCODINGS))
def test_charsets_and_encodings_parse_within_bounds(charset, body, encoding):
    raw = (
        b"From: a@example.jp\nSubject: x\nContent-Type: text/plain; charset=" + label(charset)
        + b"\nContent-Transfer-Encoding: " + encoding.encode() + b"\n\n"
        + transfer_encoded(body, encoding)
    )  # fmt: skip
    assert check(raw) is not None


# --- byte mutants of tests/data ---------------------------------------------------------------

SEED = 20261122
MUTANTS = 400
TOKENS = [
    *NASTY,
    b"\n\n", b"\r\n\r\n", b"Content-Type: multipart/mixed; boundary=x\n",
    b"Content-Transfer-Encoding: base64\n", b"charset=undefined", b"charset*=\xe3''x",
    b"begin 644 x\n", b"message/rfc822", b"=?iso-2022-jp?B?GyRCJCIbKEI?=",
]  # fmt: skip


def mutant(rng: random.Random, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(5)
        if kind == 0:  # overwrite bytes
            for i in range(at, min(len(data), at + rng.randint(1, 8))):
                data[i] = rng.choice([0x00, 0x1B, 0x80, 0xFF, rng.randrange(256)])
        elif kind == 1:  # insert a token
            data[at:at] = rng.choice(TOKENS)
        elif kind == 2:  # delete a slice
            del data[at : at + rng.randint(1, 64)]
        elif kind == 3:  # repeat a slice
            piece = bytes(data[at : at + rng.randint(1, 64)])
            data[at:at] = piece * rng.randint(2, 20)
        else:  # cut the mail short
            del data[at:]
    return bytes(data)


def test_byte_mutants_of_the_test_mails_parse_within_bounds():
    files = sorted(Path(DATA).glob("*.eml"))
    assert files
    originals = [path.read_bytes() for path in files]
    rng = random.Random(SEED)
    unreadable = 0
    for number in range(MUTANTS):
        raw = mutant(rng, originals[number % len(originals)])
        try:
            parsed = check(raw, measure_memory=number % 4 == 0)
        except BaseException as exc:
            raise AssertionError(f"mutant {number} of {files[number % len(files)].name}") from exc
        unreadable += parsed is None
    assert unreadable < MUTANTS // 10  # the mutants are still mail, nearly all of them
