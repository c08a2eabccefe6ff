"""Matching: every condition and operator, first match vs continue, defaults, due times, and the
explanation of a miss. No database here; assignment strategies are in test_rules_assign.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from config import TicketSettings
from rules.engine import evaluate
from tests.mails import simple_mail
from tests.rulesets import TUESDAY_10_JST, incoming, rules_from

AUTH_OK = "mx.wine-importer.example.jp; spf=pass smtp.mailfrom=example.com; dkim=pass (good sig) header.d=example.com; dmarc=pass header.from=example.com"  # noqa: E501
AUTH_DKIM_FAIL = "mx.wine-importer.example.jp; spf=pass; dkim=fail; dmarc=fail"
PDF = ("見積書.pdf", "application/pdf", b"%PDF-1.4 test")


def matches(tmp_path, when: str, mail) -> bool:
    rules = rules_from(
        tmp_path, f"rules:\n  - name: r\n    when: {when}\n    then: {{labels: [x]}}\n"
    )
    return evaluate(rules, mail).plan.rule_hits == ["r"]


def plain(**kwargs):
    return incoming(simple_mail(**kwargs))


CASES = [
    # from: address and domain, ignoring case
    ("{from: {address: Customer@Example.COM}}", plain(), True),
    ("{from: {domain: [example.org, example.com]}}", plain(), True),
    ("{from: {domain: example.org}}", plain(), False),
    ("{from: {address: {ends_with: '@example.com'}}}", plain(), True),
    # to: any recipient, in To, Cc or the envelope
    ("{to: {address: fax@wine-importer.example.jp}}", plain(), False),
    (
        "{to: {address: fax@wine-importer.example.jp}}",
        plain(headers={"Cc": "fax@wine-importer.example.jp"}),
        True,
    ),
    (
        "{to: {address: fax@wine-importer.example.jp}}",
        incoming(simple_mail(), rcpt_to=("fax@wine-importer.example.jp",)),
        True,
    ),
    ("{to: {domain: wine-importer.example.jp}}", plain(), True),
    # subject: every operator; contains/starts/ends/equals/in fold case and width
    ("{subject: {contains: [至急, 緊急]}}", plain(subject="【緊急】納品について"), True),
    ("{subject: {contains: [至急, 緊急]}}", plain(subject="納品について"), False),
    ("{subject: {contains: fax}}", plain(subject="ＦＡＸ送付のお願い"), True),
    ("{subject: {starts_with: [re:, 'fw:']}}", plain(subject="RE: 見積"), True),
    ("{subject: {ends_with: 在庫}}", plain(subject="ボルドーの在庫"), True),
    ("{subject: {ends_with: 在庫}}", plain(subject="在庫の問い合わせ"), False),
    ("{subject: 在庫の問い合わせ}", plain(subject="在庫の問い合わせ"), True),
    ("{subject: [a, 在庫の問い合わせ]}", plain(subject="在庫の問い合わせ"), True),
    ("{subject: {in: [a, b]}}", plain(subject="在庫の問い合わせ"), False),
    ("{subject: {regex: '^\\[INQ-\\d+\\]'}}", plain(subject="[INQ-42] 追加"), True),
    ("{subject: {regex: '^order'}}", plain(subject="ORDER 12"), False),  # regex keeps case
    ("{subject: {regex: '(?i)^order'}}", plain(subject="ORDER 12"), True),
    ("{subject: {exists: false}}", plain(subject=""), True),
    ("{subject: {exists: true, contains: 在庫}}", plain(), True),
    # body
    ("{body: {contains: [ボルドー]}}", plain(), True),
    ("{body: {regex: '在庫は(ありますか|ある)'}}", plain(), True),
    ("{body: {contains: [ブルゴーニュ]}}", plain(), False),
    # a named header
    ("{header: {name: X-Priority, equals: '1'}}", plain(headers={"X-Priority": "1"}), True),
    ("{header: {name: x-priority, exists: true}}", plain(headers={"X-Priority": "1"}), True),
    ("{header: {name: X-Priority, exists: false}}", plain(), True),
    ("{header: {name: X-Priority, equals: '1'}}", plain(), False),
    # source kind
    ("{source_kind: fax}", incoming(simple_mail(), source_kind="fax"), True),
    ("{source_kind: [phone, webform]}", incoming(simple_mail(), source_kind="fax"), False),
    # attachments: presence, type, name (Japanese file name)
    ("{attachment: true}", plain(attachments=[PDF]), True),
    ("{attachment: true}", plain(), False),
    ("{attachment: false}", plain(), True),
    ("{attachment: {type: {starts_with: application/pdf}}}", plain(attachments=[PDF]), True),
    ("{attachment: {type: image/tiff}}", plain(attachments=[PDF]), False),
    (
        "{attachment: {name: {contains: 見積}, type: application/pdf}}",
        plain(attachments=[PDF]),
        True,
    ),
    ("{attachment: {name: {ends_with: .tif}}}", plain(attachments=[PDF]), False),
    # extracted template fields
    (
        "{field: {name: requester_company, contains: 髙島屋}}",
        incoming(simple_mail(), fields={"requester_company": "㈱髙島屋ワイン"}),
        True,
    ),
    ("{field: {name: requester_company, exists: false}}", plain(), True),
    (
        "{field: {name: fax_pages, equals: '3'}}",
        incoming(simple_mail(), fields={"fax_pages": 3}),
        True,
    ),
    # follow-up and auto-reply
    ("{follow_up: true}", incoming(simple_mail(), follow_up_ticket_id=7), True),
    ("{follow_up: true}", plain(), False),
    (
        "{auto_reply: true}",
        incoming(simple_mail(), auto_reply="Auto-Submitted: auto-replied"),
        True,
    ),
    ("{auto_reply: false}", plain(), True),
    # Authentication-Results (the topmost header, added by our MTA)
    ("{auth: {dmarc: pass}}", plain(headers={"Authentication-Results": AUTH_OK}), True),
    ("{auth: {spf: pass, dkim: pass}}", plain(headers={"Authentication-Results": AUTH_OK}), True),
    ("{auth: {dkim: pass}}", plain(headers={"Authentication-Results": AUTH_DKIM_FAIL}), False),
    ("{auth: {dmarc: pass}}", plain(), False),
    # combinations
    ("{all: [{subject: {contains: 在庫}}, {from: {domain: example.com}}]}", plain(), True),
    ("{all: [{subject: {contains: 在庫}}, {from: {domain: example.org}}]}", plain(), False),
    ("{any: [{subject: {contains: 見積}}, {body: {contains: ボルドー}}]}", plain(), True),
    ("{any: [{subject: {contains: 見積}}, {body: {contains: 見積}}]}", plain(), False),
    ("{not: {subject: {contains: 見積}}}", plain(), True),
    ("{subject: {contains: 在庫}, not: {attachment: true}}", plain(), True),
    ("{always: true}", plain(), True),
]


@pytest.mark.parametrize(("when", "mail", "expected"), CASES)
def test_condition(tmp_path, when, mail, expected):
    assert matches(tmp_path, when, mail) is expected


def test_only_our_own_servers_authentication_results_count(tmp_path):
    forged = "mx.spammer.example; dmarc=pass"
    mail = plain(headers={"Authentication-Results": forged})
    mail.parsed.headers.append(("Authentication-Results", AUTH_DKIM_FAIL))
    rules = rules_from(
        tmp_path,
        """
        rules:
          - {name: dmarc-ok, when: {auth: {dmarc: pass}}, then: {labels: [ok]}}
        """,
    )
    assert evaluate(rules, mail).plan.rule_hits == []  # the forged pass is not ours


@pytest.mark.parametrize(
    ("received_at", "inside"),
    [
        (datetime(2026, 11, 24, 0, 0, tzinfo=UTC), True),  # Tue 09:00 JST: opening time
        (datetime(2026, 11, 24, 8, 59, tzinfo=UTC), True),  # Tue 17:59 JST
        (datetime(2026, 11, 24, 9, 0, tzinfo=UTC), False),  # Tue 18:00 JST: closed
        (datetime(2026, 11, 23, 23, 59, tzinfo=UTC), False),  # Tue 08:59 JST
        (datetime(2026, 11, 23, 1, 0, tzinfo=UTC), False),  # Mon 10:00 JST, a holiday
        (datetime(2026, 11, 21, 1, 0, tzinfo=UTC), False),  # Sat 10:00 JST
    ],
)
def test_business_hours_in_tokyo_with_a_holiday(tmp_path, received_at, inside):
    mail = incoming(simple_mail(), received_at=received_at)
    assert matches(tmp_path, "{business_hours: true}", mail) is inside
    assert matches(tmp_path, "{business_hours: false}", mail) is not inside


def test_first_matching_rule_decides(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - name: first
            when: {subject: {contains: 在庫}}
            then: {category: order, priority: high}
          - {name: second, when: {always: true}, then: {category: quote, labels: [late]}}
        """,
    )
    plan = evaluate(rules, plain()).plan
    assert (plan.rule_hits, plan.category, plan.priority, plan.labels) == (
        ["first"],
        "order",
        "high",
        [],
    )


def test_continue_lets_later_rules_add_but_not_override(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - name: urgent
            when: {subject: {contains: 至急}}
            then: {priority: urgent, labels: [urgent], fields: {flag: a}, continue: true}
          - name: missed
            when: {subject: {contains: 見積}}
            then: {category: quote}
          - name: stock
            when: {body: {contains: 在庫}}
            then: {category: order, priority: low, labels: [stock, urgent], fields: {flag: b, x: 1}}
          - name: never-reached
            when: {always: true}
            then: {category: inquiry}
        """,
    )
    plan = evaluate(rules, plain(subject="至急: 在庫")).plan
    assert plan.rule_hits == ["urgent", "stock"]
    assert (plan.category, plan.priority) == ("order", "urgent")
    assert plan.labels == ["urgent", "stock"]
    assert plan.fields == {"flag": "a", "x": 1}


def test_defaults_fill_what_no_rule_set(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        defaults: {category: inquiry, assignee: sales, priority: normal, labels: [inbox]}
        rules:
          - {name: quote, when: {subject: {contains: 見積}}, then: {category: quote}}
        """,
    )
    unmatched = evaluate(rules, plain()).plan
    assert (unmatched.rule_hits, unmatched.category, unmatched.priority) == (
        [],
        "inquiry",
        "normal",
    )
    assert unmatched.assignee is not None and unmatched.assignee.name == "sales"
    matched = evaluate(rules, plain(subject="見積依頼")).plan
    assert (matched.category, matched.priority, matched.labels) == ("quote", "normal", ["inbox"])


def test_explanation_names_the_failing_condition_of_every_rule(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - name: fax
            when: {all: [{from: {domain: example.com}}, {source_kind: fax}]}
            then: {category: order}
          - name: either
            when: {any: [{subject: {contains: 見積}}, {attachment: true}]}
            then: {category: quote}
          - name: all-mail
            when: {always: true}
            then: {category: inquiry}
          - name: late
            when: {subject: {contains: 在庫}}
            then: {category: order}
        """,
    )
    outcomes = evaluate(rules, plain(), explain=True).outcomes
    assert [(o.rule, o.line, o.result) for o in outcomes] == [
        ("fax", 10, "missed"),
        ("either", 13, "missed"),
        ("all-mail", 16, "applied"),
        ("late", 19, "matched-not-applied"),
    ]
    assert outcomes[0].reason == "source_kind is `email`; wanted: equals `fax`"
    assert outcomes[1].reason == (
        "none of the alternatives holds: (1) subject is `在庫の問い合わせ`; wanted: contains any "
        "of `見積`; (2) attachments: none; wanted: has an attachment"
    )
    assert outcomes[3].reason == "matched, but rule `all-mail` decided first"


def test_due_in_hours_and_next_business_day_skipping_a_holiday(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - {name: fast, when: {subject: {contains: 至急}}, then: {due_in: 4h}}
          - {name: slow, when: {always: true}, then: {due_in: 'next_business_day 10:00'}}
        """,
    )
    friday_17_jst = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    fast = evaluate(rules, plain(subject="至急")).plan.due_in
    assert rules.calendar.due(fast, friday_17_jst) == friday_17_jst + timedelta(hours=4)
    slow = evaluate(rules, plain()).plan.due_in
    # Mon 2026-11-23 is a holiday: due Tue 10:00 JST = 01:00 UTC
    assert rules.calendar.due(slow, friday_17_jst) == datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    assert rules.calendar.due("1d 2h 30m", TUESDAY_10_JST) == TUESDAY_10_JST + timedelta(
        hours=26, minutes=30
    )


def test_settings_defaults_apply_when_the_rules_set_nothing(tmp_path):
    from pipeline.context import with_ticket_defaults
    from rules.engine import decision_of

    rules = rules_from(tmp_path, "rules: []\n")
    tickets = TicketSettings(
        default_category="misc", default_assignee="desk", default_priority="low"
    )
    mail = plain()
    decision = with_ticket_defaults(decision_of(evaluate(rules, mail), rules, mail), tickets)
    assert (decision.category, decision.assignee, decision.priority) == ("misc", "desk", "low")
    assert decision.rules_version == rules.version and len(rules.version) == 64
    assert decision.due_at is None
