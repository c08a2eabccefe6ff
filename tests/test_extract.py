"""The shipped source templates extract every field of their test mails, typed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config import ConfigError
from ingest.extract import extract, load_templates, parse_datetime, parse_phone
from ingest.mail import Envelope, IncomingMail
from ingest.parse import parse
from tests.conftest import DATA
from tests.mails import simple_mail

TEMPLATES = Path(__file__).resolve().parents[1] / "templates.yaml"


def extracted(name: str) -> IncomingMail:
    raw = (DATA / name).read_bytes()
    mail = IncomingMail(1, raw, Envelope(source="file"), received_at=None)  # type: ignore[arg-type]
    mail.parsed = parse(raw)
    extract(mail, load_templates(TEMPLATES))
    return mail


def test_answering_service_template():
    mail = extracted("answering-service.eml")
    assert mail.source_kind == "phone"
    assert mail.fields == {
        "template": "answering-service",
        "received_at": "2026-11-22T10:23:00+09:00",
        "received_at_text": "2026年11月22日(日) 10時23分",
        "requester_company": "株式会社サクラ酒販",
        "requester_name": "佐藤　花子",
        "requester_kana": "ｻﾄｳ ﾊﾅｺ",
        "requester_phone": "０９０－１２３４－５６７８",
        "requester_phone_e164": "+819012345678",
        "topic": "シャブリ2022を12本、年内に納品可能か確認したいとのことです。\n"
        "見積書をFAXでお送りください。",
        "call_id": "A-1024",
    }


def test_subject_patterns_take_full_width_spaces():
    """Template patterns are RE2, whose \\s is ASCII only: the shipped ones allow U+3000."""
    raw = (DATA / "answering-service.eml").read_bytes()
    mail = IncomingMail(1, raw, Envelope(source="file"), received_at=None)  # type: ignore[arg-type]
    parsed = parse(raw)
    mail.parsed = dataclasses.replace(parsed, subject="【電話受付】（受付番号　A-1024）", text="")
    extract(mail, load_templates(TEMPLATES))
    assert mail.fields == {"template": "answering-service", "call_id": "A-1024"}


def test_fax_gateway_template_with_pdf_takes_number_and_pages_from_the_subject():
    mail = extracted("fax-gateway-pdf.eml")
    assert mail.source_kind == "fax"
    assert mail.fields == {
        "template": "fax-gateway",
        "fax_number": "03-5555-1234",
        "fax_number_e164": "+81355551234",
        "fax_pages": 3,
        "fax_received_at": "2026-11-22T10:23:45+09:00",
        "fax_received_at_text": "2026/11/22 10:23:45",
        "fax_sender_name": "ﾜｲﾝｼｮｯﾌﾟ ﾏﾂﾓﾄ",
    }


def test_fax_gateway_template_with_tiff_falls_back_to_the_body():
    mail = extracted("fax-gateway-tiff.eml")
    assert mail.fields == {
        "template": "fax-gateway",
        "fax_number": "０６－６１２３－４５６７",
        "fax_number_e164": "+81661234567",
        "fax_pages": 2,
        "fax_received_at": "2026-11-22T14:05:00+09:00",
        "fax_received_at_text": "2026年11月22日 14時05分",
    }


WEBFORM_FIELDS = {
    "contact-form7-plain.eml": {
        "template": "contact-form",
        "requester_name": "鈴木 一郎",
        "requester_company": "㈱髙島屋ワイン",
        "requester_email": "ichiro.suzuki@takashimaya-wine.example.jp",
        "requester_phone": "03-1234-5678",
        "requester_phone_e164": "+81312345678",
        "inquiry_type": "在庫確認",
        "message": "ボルドー赤（2019年）の在庫はありますか。\n６本購入を検討しています。",
    },
    "contact-form7-html.eml": {
        "template": "contact-form",
        "requester_name": "田中 美咲",
        "requester_company": "レストラン・ミサキ",
        "requester_email": "misaki@restaurant-misaki.example.jp",
        "requester_phone": "0120-123-456",
        "requester_phone_e164": "+81120123456",
        "inquiry_type": "取引のご相談",
        "message": "新規取引を希望しています。\nカタログを送ってください。",
    },
}


@pytest.mark.parametrize("name", sorted(WEBFORM_FIELDS))
def test_contact_form_template_plain_and_html(name):
    mail = extracted(name)
    assert mail.source_kind == "webform"
    assert mail.fields == WEBFORM_FIELDS[name]


def test_an_ordinary_mail_matches_no_template():
    raw = simple_mail(body="お名前：山田\n電話番号：03-1234-5678")
    mail = IncomingMail(1, raw, Envelope(source="file"), received_at=None)  # type: ignore[arg-type]
    mail.parsed = parse(raw)
    extract(mail, load_templates(TEMPLATES))
    assert (mail.source_kind, mail.fields) == ("email", {})


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2026年11月22日 10時23分", "2026-11-22T10:23:00+09:00"),
        ("2026/11/22 10:23", "2026-11-22T10:23:00+09:00"),
        ("２０２６年１１月２２日（日）午後３時５分", "2026-11-22T15:05:00+09:00"),
        ("令和8年11月22日", "2026-11-22"),
        ("2026-02-30 10:00", None),
    ],
)
def test_japanese_dates_and_times(text, iso):
    when = parse_datetime(text)
    assert (when.isoformat() if when else None) == iso


@pytest.mark.parametrize(
    ("text", "e164"),
    [("03-1234-5678", "+81312345678"), ("06(1234)5678", "+81612345678"), ("お問い合わせ", None)],
)
def test_phone_numbers(text, e164):
    assert parse_phone(text) == e164


def test_a_bad_templates_file_names_the_line_and_key(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(
        "templates:\n  - name: x\n    source_kind: phone\n    match: {}\n"
        "    fields:\n      - {key: a, labels: [x], type: money}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as error:
        load_templates(path)
    assert [str(p) for p in error.value.problems] == [
        f"{path}:4:5: templates.0.match: give at least one of sender, subject, body",
        f"{path}:6:31: templates.0.fields.0.type: `money` is not allowed here: write 'text', "
        "'name', 'phone', 'email', 'datetime' or 'integer'",
    ]


def test_template_regexes_are_re2_and_a_pattern_it_refuses_names_the_line(tmp_path):
    """RE2 runs in linear time; backtracking-only syntax (lookbehind, backreferences) is refused
    when the file is loaded, not met at intake."""
    path = tmp_path / "templates.yaml"
    path.write_text(
        "templates:\n  - name: x\n    source_kind: phone\n"
        "    match: {subject: '(?<=至急)見積'}\n"
        "    fields:\n      - {key: a, pattern: '(?P<value>a)\\1'}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as error:
        load_templates(path)
    message = str(error.value)
    assert f"{path}:4:13: templates.0.match.subject: bad regular expression" in message
    assert "invalid perl operator: (?<=" in message
    assert f"{path}:6:18: templates.0.fields.0.pattern: bad regular expression" in message


def test_a_missing_templates_file_means_no_templates(tmp_path):
    assert load_templates(tmp_path / "absent.yaml") == []
