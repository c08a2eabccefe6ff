"""Auto-replies, bounces and loops; quoted text in replies; replies landing on their ticket."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from ingest.detect import auto_reply_reason, strip_quoted
from ingest.intake import receive
from ingest.mail import Envelope
from ingest.parse import parse
from pipeline.process import PipelineContext, process
from storage.models import InboundMessage, Ticket, TicketComment
from storage.states import Fate
from tests.conftest import DATA
from tests.mails import simple_mail

FILE = Envelope(source="file")


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Auto-Submitted": "auto-replied"}, "Auto-Submitted: auto-replied"),
        ({"X-Autoreply": "yes"}, "X-Autoreply header"),
        ({"X-Autorespond": "yes"}, "X-Autorespond header"),
        ({"X-Loop": "inquiry@wine-importer.example.jp"}, "X-Loop header"),
        ({"Precedence": "bulk"}, "Precedence: bulk"),
        ({"Precedence": "junk"}, "Precedence: junk"),
        ({"X-Auto-Response-Suppress": "All"}, "X-Auto-Response-Suppress: All"),
        ({"Return-Path": "<>"}, "null sender (Return-Path <>)"),
        ({"List-Id": "<wine.lists.example.jp>"}, "mailing list (List-Id)"),
        ({"X-ML-Name": "wine-lovers"}, "mailing list (X-ML-Name)"),
    ],
)
def test_auto_reply_headers(headers, reason):
    assert auto_reply_reason(parse(simple_mail(headers=headers)), None) == reason


def test_auto_submitted_no_and_a_plain_mail_are_not_auto_replies():
    assert auto_reply_reason(parse(simple_mail(headers={"Auto-Submitted": "no"})), None) is None
    assert auto_reply_reason(parse(simple_mail()), "customer@example.com") is None


def test_null_envelope_sender_and_bounce_senders():
    assert auto_reply_reason(parse(simple_mail()), "") == "null sender (Return-Path <>)"
    bounce = parse(simple_mail(sender="MAILER-DAEMON@mx.example.jp"))
    assert auto_reply_reason(bounce, None) == "bounce: sent by mailer-daemon@mx.example.jp"


def test_a_delivery_report_is_a_bounce():
    raw = (
        b"From: Mail Delivery System <mta@example.jp>\nSubject: Undelivered Mail\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="b"\n\n--b\nContent-Type: text/plain\n\nfailed\n'
        b"--b\nContent-Type: message/delivery-status"
        b"\n\nReporting-MTA: dns; mx.example.jp\n\nFinal-Recipient: rfc822; x@example.jp\n"
        b"Action: failed\n--b--\n"
    )
    assert auto_reply_reason(parse(raw), None) == "bounce: multipart/report"


def test_japanese_reply_header_and_quoted_lines_are_stripped():
    parsed = parse((DATA / "reply-japanese-quoted.eml").read_bytes())
    assert strip_quoted(parsed.text) == (
        "佐藤です。\n\nお見積りありがとうございます。\n"
        "この内容で発注いたします。納品は12月1日でお願いします。"
    )


def test_original_message_separator_cuts_the_rest():
    parsed = parse((DATA / "reply-outlook-original-message.eml").read_bytes())
    assert strip_quoted(parsed.text) == "承知しました。よろしくお願いします。"


def test_bottom_posting_keeps_the_answer_below_the_quote():
    text = "Am 07.05.2012 08:10, schrieb Martin:\n> Hallo Marc\n>\nHallo Martin,\n\nok\n"
    assert strip_quoted(text) == "Hallo Martin,\n\nok"


def test_a_colon_line_that_is_no_attribution_stays():
    text = "ご質問は次の通りです:\n> 在庫はありますか\n回答: あります"
    assert strip_quoted(text) == "ご質問は次の通りです:\n回答: あります"


def test_an_all_quoted_mail_keeps_its_text():
    assert strip_quoted("> only a quote") == "> only a quote"


def ingest(pipeline, raw: bytes, envelope: Envelope = FILE) -> Fate | None:
    return process(pipeline, receive(pipeline.sessions, raw, envelope))


def test_a_japanese_reply_becomes_a_comment_without_the_quote(pipeline, sessions):
    first = simple_mail(
        subject="シャブリ2022の在庫",
        sender="hanako@sakura-shuhan.example.jp",
        message_id="<order-ask-1@sakura-shuhan.example.jp>",
    )
    assert ingest(pipeline, first) == Fate.TICKET
    reply = (DATA / "reply-japanese-quoted.eml").read_bytes()
    assert ingest(pipeline, reply) == Fate.COMMENT
    with sessions() as session:
        comment = session.scalars(select(TicketComment)).one()
        ticket = session.scalars(select(Ticket)).one()
        assert comment.ticket_id == ticket.id
        assert comment.body.startswith("佐藤です。")
        assert ">" not in comment.body and "2026年11月22日(日)" not in comment.body
        assert "> シャブリ2022は在庫がございます。" in comment.body_full


def test_an_auto_reply_to_nothing_is_dropped_with_its_reason(pipeline, sessions):
    raw = simple_mail(subject="不在のお知らせ", headers={"Auto-Submitted": "auto-replied"})
    assert ingest(pipeline, raw) == Fate.DROPPED
    with sessions() as session:
        row = session.scalars(select(InboundMessage)).one()
        assert row.drop_reason == "auto-reply: Auto-Submitted: auto-replied"


def test_an_auto_reply_to_a_ticket_joins_it(pipeline):
    assert ingest(pipeline, simple_mail(message_id="<ask-2@example.com>")) == Fate.TICKET
    auto = simple_mail(
        subject="Out of office", headers={"In-Reply-To": "<ask-2@example.com>", "X-Autoreply": "1"}
    )
    assert ingest(pipeline, auto) == Fate.COMMENT


def test_template_fields_fill_the_ticket(pipeline, sessions):
    assert ingest(pipeline, (DATA / "contact-form7-plain.eml").read_bytes()) == Fate.TICKET
    with sessions() as session:
        ticket = session.scalars(select(Ticket)).one()
        assert (ticket.source_kind, ticket.requester_name, ticket.requester_email) == (
            "webform",
            "鈴木 一郎",
            "ichiro.suzuki@takashimaya-wine.example.jp",
        )
        assert (ticket.requester_phone, ticket.requester_company) == (
            "+81312345678",  # one normalised form in the column
            "㈱髙島屋ワイン",
        )
        assert ticket.fields["requester_phone"] == "03-1234-5678"  # as written
        assert ticket.fields["inquiry_type"] == "在庫確認"


def test_mail_from_our_own_notifications_is_dropped_as_a_loop(settings, sessions):
    settings.detect.own_senders = ["tracker-notify@wine-importer.example.jp"]
    pipeline = PipelineContext(settings, sessions)
    assert ingest(pipeline, simple_mail(message_id="<ask-3@example.com>")) == Fate.TICKET
    notification = simple_mail(
        subject="[INQ-1] 担当者が決まりました",
        sender="Tracker <Tracker-Notify@wine-importer.example.jp>",
        headers={"In-Reply-To": "<ask-3@example.com>"},
    )
    assert ingest(pipeline, notification) == Fate.DROPPED
    with sessions() as session:
        dropped = session.scalars(select(InboundMessage).order_by(InboundMessage.id)).all()[-1]
        assert dropped.drop_reason == (
            "loop: sent by our own address tracker-notify@wine-importer.example.jp"
        )
        assert session.scalars(select(TicketComment)).all() == []


def test_a_gateway_mail_from_an_own_sender_address_is_no_loop(settings, sessions):
    """The web form notifies from our domain; its template recognises it, so it is an inquiry."""
    raw = (DATA / "contact-form7-plain.eml").read_bytes()
    sender = re.search(rb"^From: .*<([^>]+)>", raw, re.MULTILINE)
    assert sender is not None
    settings.detect.own_senders = [sender.group(1).decode().lower()]
    pipeline = PipelineContext(settings, sessions)
    assert ingest(pipeline, raw) == Fate.TICKET


def test_bounce_patterns_are_linear_on_hostile_text():
    """`delivery.*failed` under Python's `re` took 14 s on 80 KB of repeated "delivery"; every
    detection pattern is RE2 now, so this returns at once (a regression hangs the test)."""
    from ingest.detect import BOUNCE_TEXT

    assert BOUNCE_TEXT.search("delivery " * 10_000) is None
    assert BOUNCE_TEXT.search("Delivery to the following recipient FAILED") is not None


@pytest.mark.parametrize(
    "subject",
    [
        "【不在通知】Re: 見積のご依頼",
        "[自動返信] お問い合わせありがとうございます",
        "自動応答: 在庫の問い合わせ",
        "【休暇のお知らせ】12/28～1/4",
        "Automatic reply: order 1234",
        "Out of Office: Re: invoice",
    ],
)
def test_japanese_and_outlook_auto_reply_subjects_are_auto_replies(subject):
    parsed = parse(simple_mail(subject=subject))
    assert auto_reply_reason(parsed, "someone@example.com") is not None


@pytest.mark.parametrize(
    "subject", ["休暇中の配送について", "不在時の受け取り方法", "Re: 自動返信の設定"]
)
def test_a_customer_subject_that_only_mentions_absence_is_not_an_auto_reply(subject):
    parsed = parse(simple_mail(subject=subject))
    assert auto_reply_reason(parsed, "someone@example.com") is None
