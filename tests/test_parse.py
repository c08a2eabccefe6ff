"""Decoding what Japanese (and other) mailers really send: charsets, headers, HTML, attachments."""

from __future__ import annotations

import base64
import json
import quopri
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli import app
from ingest.charsets import decode_bytes
from ingest.intake import receive
from ingest.mail import Envelope
from ingest.parse import UnreadableMail, parse, sanitise_filename
from pipeline.process import process
from storage.models import Ticket
from storage.states import Fate
from tests.conftest import DATA
from tests.mails import simple_mail
from tests.rulesets import OUR_MTA


def mail(headers: str, body: bytes = b"body\n") -> bytes:
    return headers.strip().encode("utf-8", "surrogateescape") + b"\n\n" + body


def with_pdf(part_headers: bytes) -> bytes:
    """A mail with one PDF attachment whose part starts with `part_headers` (raw bytes)."""
    return mail(
        "From: a@example.jp\nSubject: x\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"',
        b"--b\nContent-Type: text/plain\n\nbody\n--b\n"
        + part_headers
        + b"\nContent-Transfer-Encoding: base64\n\n"
        + base64.b64encode(b"%PDF-1.4")
        + b"\n--b--\n",
    )


@pytest.mark.parametrize(
    ("data", "label", "text"),
    [
        ("①㈱～髙ｶﾀｶﾅ".encode("cp932"), "shift_jis", "①㈱～髙ｶﾀｶﾅ"),
        ("東京都".encode("euc_jp"), "euc-jp", "東京都"),
        ("简体中文".encode("gb18030"), "gb2312", "简体中文"),
        (b"Hi Mom -+Jjo--!", "utf-7", "Hi Mom -☺-!"),
        ("こんにちは、在庫です".encode(), "iso-2022-jp", "こんにちは、在庫です"),
        ("こんにちは、在庫です".encode("euc_jp"), "iso-2022-jp", "こんにちは、在庫です"),
        ("こんにちは、在庫です".encode("cp932"), None, "こんにちは、在庫です"),
        ("Grüße".encode(), "iso-8859-1", "Grüße"),
        ("Grüße, ça coûte 10 €".encode("cp1252"), "iso-8859-1", "Grüße, ça coûte 10 €"),
        ("Grüße, ça coûte 10 €".encode("cp1252"), "windows-1252", "Grüße, ça coûte 10 €"),
        ("ヤマダ".encode("cp932"), "iso-8859-1", "ヤマダ"),
        ("こんにちは".encode("cp932"), "windows-1252", "こんにちは"),
        ("ヤマダです".encode("euc_jp"), "iso-8859-1", "ヤマダです"),
        ("ヤマダ".encode("cp932"), "us-ascii", "ヤマダ"),
        ("見積書.pdf".encode("cp932"), None, "見積書.pdf"),
    ],
)
def test_decode_bytes_reads_labels_and_corrects_wrong_ones(data, label, text):
    assert decode_bytes(data, label)[0] == text


def test_a_wrong_or_missing_label_is_a_defect():
    text, defects = decode_bytes("在庫です".encode("cp932"), None)
    assert text == "在庫です"
    assert defects == ["8-bit text not labelled: decoded as cp932"]


def test_shift_jis_labelled_latin1_is_read_as_japanese_with_a_defect():
    """Every Shift_JIS kana byte is valid CP1252, so the label alone gave silent mojibake."""
    body = "こんにちは".encode("cp932")
    parsed = parse(
        mail("From: a@example.jp\nSubject: x\nContent-Type: text/plain; charset=ISO-8859-1", body)
    )
    assert parsed.text == "こんにちは"
    assert parsed.defects == ["text/plain: 8-bit text labelled iso-8859-1: decoded as cp932"]


def test_iso2022jp_with_cp932_extensions_and_half_width_kana():
    raw = (DATA / "answering-service-iso2022jp.eml").read_bytes()
    parsed = parse(raw)
    assert parsed.subject == "【電話受付】①㈱髙島屋ワイン様よりお問い合わせ"
    assert "ｶﾀｶﾅ" in parsed.text
    assert parsed.defects == []


def test_seven_bit_iso2022jp_without_any_charset_label():
    body = "テスト本文".encode("iso2022_jp")
    parsed = parse(mail("From: a@example.jp\nSubject: x", body))
    assert parsed.text == "テスト本文"
    assert any("ISO-2022-JP" in d for d in parsed.defects)


def test_raw_8bit_headers_and_a_bom_before_the_first_header():
    raw = b"\xef\xbb\xbf" + mail(
        "From: 山田 太郎 <yamada@example.jp>\nSubject: 在庫の確認\nContent-Type: text/plain",
        "本文".encode(),
    )
    parsed = parse(raw)
    assert (parsed.subject, parsed.from_name, parsed.from_email) == (
        "在庫の確認",
        "山田 太郎",
        "yamada@example.jp",
    )


def test_raw_iso2022jp_in_address_headers():
    from_ = "差出人".encode("iso2022_jp").decode("ascii")
    parsed = parse(mail(f"From: {from_} <sender@example.jp>\nSubject: x"))
    assert (parsed.from_name, parsed.from_email) == ("差出人", "sender@example.jp")


@pytest.mark.parametrize(
    ("subject", "decoded"),
    [
        ("=?UTF-8?B?6KaL56mN?= お願い", "見積 お願い"),
        ("お願い =?UTF-8?B?6KaL56mN?=", "お願い 見積"),
        (
            "=?UTF-8?B?6KaL56mN?= " + "ヤマダ".encode("cp932").decode("utf-8", "surrogateescape"),
            "見積 ヤマダ",
        ),
        ("=?UTF-8?B?6KaL56mN?= C:\\u0041", "見積 C:\\u0041"),
    ],
)
def test_encoded_words_beside_raw_8bit_text_in_one_header(subject, decoded):
    parsed = parse(mail(f"From: a@example.jp\nSubject: {subject}"))
    assert parsed.subject == decoded


def test_encoded_word_split_in_the_middle_of_a_character():
    data = "在庫確認".encode()
    first, second = base64.b64encode(data[:4]).decode(), base64.b64encode(data[4:]).decode()
    subject = f"=?UTF-8?B?{first}?=\n =?UTF-8?B?{second}?="
    assert parse(mail(f"From: a@example.jp\nSubject: {subject}")).subject == "在庫確認"


def test_html_only_mail_becomes_readable_text_and_keeps_the_html():
    parsed = parse((DATA / "contact-form7-html.eml").read_bytes())
    assert parsed.html is not None and "<table>" in parsed.html
    assert "新規取引を希望しています。\nカタログを送ってください。" in parsed.text
    assert "track()" not in parsed.text and "padding" not in parsed.text


def test_rfc2231_and_rfc2047_attachment_names_and_an_unnamed_inline_fax_image():
    pdf = parse((DATA / "fax-gateway-pdf.eml").read_bytes()).attachments
    assert [(a.filename, a.content_type) for a in pdf] == [
        ("FAX受信_20261122.pdf", "application/pdf")
    ]
    assert pdf[0].content.startswith(b"%PDF")
    tiff = parse((DATA / "fax-gateway-tiff.eml").read_bytes()).attachments
    assert [(a.filename, a.content_type, a.inline) for a in tiff] == [
        ("attachment-1.tiff", "image/tiff", True)
    ]


def test_non_standard_encoded_words_in_quoted_attachment_names():
    name = base64.b64encode("見積書.pdf".encode("iso2022_jp")).decode()
    raw = with_pdf(
        f'Content-Type: application/pdf; name="=?ISO-2022-JP?B?{name}?="\n'.encode()
        + b"Content-Disposition: attachment"
    )
    assert [a.filename for a in parse(raw).attachments] == ["見積書.pdf"]


@pytest.mark.parametrize(
    ("headers", "name", "codec"),
    [
        (
            'Content-Type: application/pdf\nContent-Disposition: attachment; filename="{}"',
            "見積書.pdf",
            "utf-8",
        ),
        (
            'Content-Type: application/pdf; name="{}"\nContent-Disposition: attachment',
            "見積書.pdf",
            "utf-8",
        ),
        (
            'Content-Type: application/pdf\nContent-Disposition: attachment; filename="{}"',
            "見積書.pdf",
            "cp932",
        ),
        # ソ and 表 end in the byte of `\`: it must not escape the closing quote
        (
            'Content-Type: application/pdf; name="{}";;\nContent-Disposition: attachment',
            "ソフト表.pdf",
            "cp932",
        ),
    ],
)
def test_raw_8bit_attachment_names(headers, name, codec):
    raw = with_pdf(headers.format("{}").encode().replace(b"{}", name.encode(codec)))
    parsed = parse(raw)
    assert [(a.filename, a.original_filename) for a in parsed.attachments] == [(name, name)]
    assert f"header: 8-bit text not labelled: decoded as {codec}" in parsed.defects


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\見積書.pdf", "見積書.pdf"),
        ("con.txt", "_con.txt"),
        ("a\x00b:c?.pdf", "a_b_c_.pdf"),
        ("", "fallback.bin"),
    ],
)
def test_attachment_names_are_sanitised(name, safe):
    assert sanitise_filename(name, "fallback.bin") == safe


TRANSFER_ENCODED = {
    "7bit": lambda inner: inner,
    "base64": base64.encodebytes,
    "quoted-printable": quopri.encodestring,
}


@pytest.mark.parametrize("encoding", sorted(TRANSFER_ENCODED))
def test_forwarded_message_is_kept_whole_as_an_eml_attachment(encoding):
    """RFC 2046 allows only 7bit/8bit/binary on message/rfc822; base64 and quoted-printable
    are decoded all the same, with a defect."""
    inner = simple_mail(subject="元のメール", body="転送された本文" + "。" * 40)
    boundary = b"--===="
    raw = mail(
        "From: a@example.jp\nSubject: Fwd\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="===="',
        boundary
        + b"\nContent-Type: text/plain; charset=utf-8\n\n"
        + "転送します".encode()
        + b"\n"
        + boundary
        + f"\nContent-Type: message/rfc822\nContent-Transfer-Encoding: {encoding}\n\n".encode()
        + TRANSFER_ENCODED[encoding](inner)
        + b"\n"
        + boundary
        + b"--\n",
    )
    parsed = parse(raw)
    assert parsed.text == "転送します"
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("元のメール.eml", "message/rfc822")
    ]
    forwarded = parse(parsed.attachments[0].content)
    assert (forwarded.subject, forwarded.text) == ("元のメール", "転送された本文" + "。" * 40)
    decoded = f"message/rfc822 part in {encoding}: decoded"
    assert (decoded in parsed.defects) == (encoding != "7bit")


CONTROL_CHARACTERS = DATA / "control-characters.eml"


def test_control_characters_are_removed_from_all_text_with_a_defect():
    parsed = parse(CONTROL_CHARACTERS.read_bytes())
    assert (parsed.subject, parsed.from_name) == ("在庫[31m", "山田")
    assert parsed.text == "NUL and ESC[31m removed,\ttab kept"
    assert parsed.html == "<p>NUL in HTML</p>"
    assert ("X-Note", "ab") in parsed.headers
    assert [a.original_filename for a in parsed.attachments] == ["見積.pdf"]
    assert {
        "header: control characters removed",
        "text/plain: control characters removed",
        "text/html: control characters removed",
    } <= set(parsed.defects)


def test_a_mail_with_nul_characters_becomes_a_ticket(pipeline, sessions):
    """PostgreSQL text columns refuse NUL: it must not reach the store."""
    inbound_id = receive(sessions, CONTROL_CHARACTERS.read_bytes(), Envelope(source="file"))
    assert process(pipeline, inbound_id) == Fate.TICKET
    with sessions() as session:
        ticket = session.scalars(select(Ticket)).one()
        assert (ticket.subject, ticket.requester_name) == ("在庫[31m", "山田")


def test_deep_mime_nesting_is_cut_off_as_a_defect():
    raw = b"From: a@example.jp\nSubject: deep\nMIME-Version: 1.0\n"
    depth = 40
    for level in range(depth):
        raw += f'Content-Type: multipart/mixed; boundary="b{level}"\n\n--b{level}\n'.encode()
    raw += b"Content-Type: text/plain\n\ninnermost\n"
    for level in reversed(range(depth)):
        raw += f"--b{level}--\n".encode()
    parsed = parse(raw)
    assert any("nesting deeper" in d for d in parsed.defects)


@pytest.mark.parametrize("raw", [b"", b"   \n", b"Lorem ipsum dolor sit amet\n\nmore prose\n"])
def test_bytes_that_are_not_mail_are_unreadable(raw):
    with pytest.raises(UnreadableMail):
        parse(raw)


def test_cli_parse_shows_what_the_pipeline_reads(tmp_path, monkeypatch):
    templates = Path(__file__).resolve().parents[1] / "templates.yaml"
    config = tmp_path / "config.yaml"
    database = f"sqlite:///{tmp_path / 'unused.db'}"
    config.write_text(
        f"database: {{url: '{database}'}}\ntemplates: {{path: '{templates}'}}\n"
        f"authserv_id: {OUR_MTA}\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    result = runner.invoke(
        app, ["--config", str(config), "parse", str(DATA / "fax-gateway-pdf.eml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert (view["source_kind"], view["auto_reply"]) == ("fax", None)
    assert view["fields"]["fax_pages"] == 3
    assert [a["filename"] for a in view["attachments"]] == ["FAX受信_20261122.pdf"]
    assert ["Subject", "FAX受信 送信元:03-5555-1234 (3ページ)"] in view["headers"]
    assert not (tmp_path / "unused.db").exists()

    unreadable = tmp_path / "prose.txt"
    unreadable.write_text("Lorem ipsum dolor sit amet\n", encoding="utf-8")
    result = runner.invoke(app, ["--config", str(config), "parse", str(unreadable)])
    assert result.exit_code == 1
    assert "not an email message" in result.stderr
