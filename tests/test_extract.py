"""The shipped source templates extract every field of their test mails, typed; in the zone
given; in linear time whatever the mail holds."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import ingest.extract
from config import ConfigError
from ingest.extract import (
    HINT,
    extract,
    is_separator,
    load_templates,
    parse_datetime,
    parse_phone,
    undecorated,
    without_honorific,
)
from ingest.intake import unstored_mail
from ingest.mail import Envelope, IncomingMail
from ingest.parse import parse
from tests.conftest import DATA
from tests.mails import simple_mail
from tests.rulesets import OUR_MTA

TEMPLATES = Path(__file__).resolve().parents[1] / "templates.yaml"


def extracted(name: str, zone: ZoneInfo | None = None) -> IncomingMail:
    return extracted_from((DATA / name).read_bytes(), zone)


def extracted_from(raw: bytes, zone: ZoneInfo | None = None) -> IncomingMail:
    mail = unstored_mail(raw, Envelope(source="file"), datetime.now(UTC))
    mail.parsed = parse(raw)
    if zone is None:
        extract(mail, load_templates(TEMPLATES), authserv_id=OUR_MTA)
    else:
        extract(mail, load_templates(TEMPLATES), zone, OUR_MTA)
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
    mail = unstored_mail(raw, Envelope(source="file"), datetime.now(UTC))
    parsed = parse(raw)
    mail.parsed = dataclasses.replace(parsed, subject="【電話受付】（受付番号　A-1024）", text="")
    extract(mail, load_templates(TEMPLATES), authserv_id=OUR_MTA)
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
    mail = unstored_mail(raw, Envelope(source="file"), datetime.now(UTC))
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


def test_a_template_time_without_a_zone_is_read_in_the_zone_given():
    """The service's one zone (config `timezone`) is passed in; Asia/Tokyo is the default."""
    berlin = extracted("answering-service.eml", ZoneInfo("Europe/Berlin"))
    assert berlin.fields["received_at"] == "2026-11-22T10:23:00+01:00"
    assert berlin.fields["received_at_text"] == "2026年11月22日(日) 10時23分"
    assert extracted("answering-service.eml").fields["received_at"] == "2026-11-22T10:23:00+09:00"
    summer = parse_datetime("2026/07/01 09:00", ZoneInfo("Europe/Berlin"))
    assert summer is not None and summer.isoformat() == "2026-07-01T09:00:00+02:00"


HOSTILE_FORM = (
    "From: wordpress@wine-importer.example.jp\nSubject: x\n\n"
    "お問い合わせフォームから送信されました\nx" + " " * 30000 + "y: v"
)


def test_a_30_kb_line_of_spaces_is_extracted_promptly():
    """Python's `re` took over a minute on this line (backtracking in the label decoration);
    RE2 and plain string code take milliseconds. Quadratic code would make this test hang."""
    mail = extracted_from(HOSTILE_FORM.encode("utf-8"))
    hint = mail.fields[HINT]  # an unsigned copy of the form's format: only a hint
    assert (mail.source_kind, hint["template"], set(hint)) == (
        "email",
        "contact-form",
        {"template", "unproven"},
    )


@pytest.mark.parametrize(
    "line",
    [
        "お名前: 山田" + " " * 30000 + "x",  # name: honorific at the end
        "お名前: " + "　" * 30000 + "様x",  # full-width spaces
        "メールアドレス: " + "a" * 30000,  # email: a local part without @
        "メールアドレス: " + "a@" * 15000,
        "電話番号: " + "1 " * 15000,  # phone
        "お名前: " + "<" * 15000 + "a" * 15000,  # name: angle-bracket address removal
        "【" * 15000 + " " * 15000 + "】お名前: 山田",  # label decoration
        " " * 30000 + "-",  # a separator line inside a multi-line value
    ],
)
def test_hostile_field_values_are_extracted_promptly(line):
    body = f"お問い合わせフォームから送信されました\nお問い合わせ内容:\n{line}\n{line}\n"
    raw = f"From: wordpress@wine-importer.example.jp\nSubject: x\n\n{body}x\n"
    mail = extracted_from(raw.encode("utf-8"))
    assert mail.fields[HINT]["template"] == "contact-form"


def test_hostile_datetimes_are_read_promptly():
    for text in ["1/1/1(" * 5000, "令和" + " " * 30000, "2026年1月1日" + "(" * 30000]:
        parse_datetime(text)


def test_no_python_re_pattern_runs_on_mail_text():
    """Every pattern in the extraction module is RE2 (linear time)."""
    assert not [name for name, value in vars(ingest.extract).items() if value is re]
    assert not [
        name for name, value in vars(ingest.extract).items() if isinstance(value, re.Pattern)
    ]


@pytest.mark.parametrize(
    ("label", "plain"),
    [("■お名前", "お名前"), ("【会社名】", "会社名"), (" ・電話番号 ", "電話番号"),
     ("[お名前]", "お名前"), ("（TEL）", "TEL"), ("　＜Eメール＞　", "Eメール"), ("■", ""),
     ("お名前", "お名前")],
)  # fmt: skip
def test_label_decoration_is_removed(label, plain):
    assert undecorated(label) == plain


def test_honorifics_and_separators():
    assert [
        without_honorific(n) for n in ["山田 様", "山田さま", "山田　殿", "佐藤さん", "様"]
    ] == [
        "山田",
        "山田",
        "山田",
        "佐藤",
        "",
    ]
    assert without_honorific("山田様さん") == "山田様"
    assert [is_separator(line) for line in ["----", " ＝＝＝ ", "━━", "-", "-=-", "--x"]] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_a_missing_templates_file_is_an_error_unless_it_is_the_unconfigured_default(tmp_path):
    assert load_templates(tmp_path / "absent.yaml", required=False) == []
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load_templates(tmp_path / "absent.yaml")


def test_the_fax_sender_is_the_requester_with_an_e164_number():
    mail = extracted("fax-gateway-pdf.eml")
    assert mail.source_kind == "fax"
    assert mail.requester.name == mail.fields["fax_sender_name"]
    assert mail.requester.phone == mail.fields["fax_number_e164"]
    assert mail.requester.phone.startswith("+81")


def test_the_answering_service_caller_phone_is_stored_in_e164():
    mail = extracted("answering-service-iso2022jp.eml")
    assert mail.requester.phone is not None and mail.requester.phone.startswith("+81")
    assert mail.requester.phone == mail.fields["requester_phone_e164"]
    assert mail.requester.company == mail.fields["requester_company"]


def test_a_phone_number_in_an_ordinary_mail_is_found():
    raw = simple_mail(body="在庫について折り返しお願いします。\nTEL: 03-9876-5432\n山田")
    mail = extracted_from(raw)
    assert mail.source_kind == "email"
    assert (mail.requester.email, mail.requester.phone) == ("customer@example.com", "+81398765432")
