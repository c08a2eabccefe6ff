"""Spoofing (issue #12, item 11): only our MTA's Authentication-Results count, rules that test
`auth` need to know which they are, and copying a gateway's format is only a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli import app
from config import DEFAULT_TIMEZONE, zone_named
from ingest.authres import trusted_results
from ingest.binding import Binding
from ingest.extract import HINT, load_templates
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from rules.engine import RulesRouter, evaluate
from rules.load import auth_without_authserv_id
from rules.reload import RulesHolder
from storage.models import Ticket
from storage.states import Fate
from tests.conftest import DATA
from tests.mails import simple_mail
from tests.rulesets import OUR_MTA, incoming, rules_from, shipped_rules, write_rules

ROOT = Path(__file__).resolve().parents[2]
OURS = f"Authentication-Results: {OUR_MTA};"
STAFF = "yamada@wine-importer.example.jp"


def with_headers(raw: bytes, *headers: str) -> bytes:
    """`raw` as our MTA delivers it: `headers` prepended, top first."""
    return "".join(f"{h}\r\n" for h in headers).encode() + raw


def own_domain_mail(*headers: str) -> bytes:
    return with_headers(simple_mail(sender=STAFF, subject="請求書の件"), *headers)


def drop_reason(raw: bytes) -> str | None:
    return evaluate(shipped_rules(), incoming(raw)).plan.drop_reason


# --- only our MTA's headers count ---------------------------------------------------------------


SUBMITTED = (
    "Received: from [192.0.2.44] (unknown [192.0.2.44]) (Authenticated sender: yamada)"
    " by mx.wine-importer.example.jp (Postfix) with ESMTPSA id 4Xk2P1"
)
FROM_OUTSIDE = "Received: from outside.example (outside.example [198.51.100.80])"
DMARC_FAIL = f"{OURS} dmarc=fail (p=reject) header.from=wine-importer.example.jp"
SPOOFED = "sender claims wine-importer.example.jp but fails DMARC"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        # a staff forward by authenticated submission: OpenDMARC (IgnoreAuthenticatedClients)
        # writes no verdict, and the mail is kept
        ([SUBMITTED], None),
        # an outsider: our MTA's verdict on top; the forged pass below it does not count
        ([DMARC_FAIL, f"{OURS} spf=pass; dkim=pass; dmarc=pass", FROM_OUTSIDE], SPOOFED),
    ],
)
def test_the_shipped_rules_drop_a_dmarc_fail_and_keep_a_staff_forward(headers, reason):
    assert drop_reason(own_domain_mail(*headers)) == reason


@pytest.mark.parametrize(
    ("headers", "holds"),
    [
        ([f"{OURS} dmarc=pass header.from=example.com"], True),
        # another server's header never counts, above ours or alone
        (["Authentication-Results: mx.spammer.example; dmarc=pass", f"{OURS} dmarc=fail"], False),
        (["Authentication-Results: mx.spammer.example; dmarc=pass"], False),
        # our verdict on top wins over a forged one with our id below it
        ([f"{OURS} dmarc=fail", f"{OURS} dmarc=pass"], False),
        # below another server's header, a header with our id came with the mail
        (["Authentication-Results: mx.google.com; dkim=pass", f"{OURS} dmarc=pass"], False),
        # the id is the first word, comments and a version aside; not a word inside a comment
        ([f"Authentication-Results: (ours) {OUR_MTA} 1; dmarc=pass"], True),
        (["Authentication-Results: mx.spammer.example (" + OUR_MTA + "); dmarc=pass"], False),
        ([f"Authentication-Results: {OUR_MTA}.spammer.example; dmarc=pass"], False),
    ],
)
def test_only_the_topmost_headers_of_our_mta_count(tmp_path, headers, holds):
    rules = rules_from(
        tmp_path, "rules:\n  - {name: ok, when: {auth: {dmarc: pass}}, then: {labels: [ok]}}\n"
    )
    raw = with_headers(simple_mail(), *headers)
    assert (evaluate(rules, incoming(raw)).plan.rule_hits == ["ok"]) is holds


# --- rules that test auth need the authserv-id ----------------------------------------------------

AUTH_RULE = """\
rules:
  - name: tag-ok
    when: {subject: x}
    then: {labels: [x]}
  - name: drop-unverified
    when:
      not: {auth: {dmarc: pass}}
    then: {drop: unverified}
"""


def run_cli(tmp_path: Path, *args: str, authserv_id: str | None = None):
    config = tmp_path / "config.yaml"
    text = f"database: {{url: 'sqlite:///{tmp_path}/m.db'}}\n"
    config.write_text(text + (f"authserv_id: {authserv_id}\n" if authserv_id else ""))
    return CliRunner().invoke(app, ["--config", str(config), *args])


def test_rules_check_refuses_a_rule_testing_auth_without_an_authserv_id(tmp_path):
    path = write_rules(tmp_path, AUTH_RULE, with_people=False)
    result = run_cli(tmp_path, "rules", "check", str(path))
    assert result.exit_code == 1
    assert (
        f"{path}:7:13: rules.1.when.not.auth: rule `drop-unverified`: tests `auth`, but no "
        "`authserv_id` is configured" in result.output
    )
    assert "set `authserv_id` in config.yaml" in " ".join(result.output.split())
    assert run_cli(tmp_path, "rules", "check", str(path), authserv_id=OUR_MTA).exit_code == 0


def test_auth_without_authserv_id_names_each_auth_test(tmp_path):
    path = write_rules(tmp_path, AUTH_RULE, with_people=False)
    problems = auth_without_authserv_id(path, None)
    assert [(p.line, p.column, p.key) for p in problems] == [(7, 13, "rules.1.when.not.auth")]
    assert auth_without_authserv_id(path, OUR_MTA) == []


def test_a_reload_that_adds_an_auth_test_without_an_authserv_id_keeps_the_last_good_rules(
    tmp_path,
):
    path = write_rules(tmp_path, AUTH_RULE.split("  - name: drop")[0], with_people=False)
    holder = RulesHolder.load(path, zone_named(DEFAULT_TIMEZONE), None)
    good = holder.current().version
    write_rules(tmp_path, AUTH_RULE, with_people=False)
    assert holder.reload() is False
    assert holder.current().version == good
    assert holder.last_error is not None and "rules.1.when.not.auth" in holder.last_error


def test_an_authserv_id_in_the_rules_file_is_refused_saying_where_it_went(tmp_path):
    path = write_rules(tmp_path, f"authserv_id: {OUR_MTA}\n", with_people=False)
    result = run_cli(tmp_path, "rules", "check", str(path))
    assert result.exit_code == 1
    assert "`authserv_id` in config.yaml" in " ".join(result.output.split())


# --- a template's format from anyone is only a hint -----------------------------------------------

ANSWERING_SERVICE = (DATA / "answering-service.eml").read_bytes().split(b"\n", 2)[2]
GATEWAY_SIGNED = f"{OURS} dkim=pass header.d=denwa-daiko.example.com header.b=Ab3dEf9h"


@pytest.fixture
def routed(settings, sessions):
    rules = shipped_rules()
    templates = load_templates(ROOT / "templates.yaml")
    return PipelineContext(settings, sessions, RulesRouter(lambda: rules), templates=templates)


def ticket_of(ctx: PipelineContext, raw: bytes, envelope: Envelope) -> Ticket:
    assert process(ctx, receive(ctx.sessions, raw, envelope)) == Fate.TICKET
    with ctx.sessions() as session:
        ticket = session.scalars(select(Ticket).order_by(Ticket.id.desc())).first()
    assert ticket is not None
    return ticket


@pytest.mark.parametrize(
    "headers",
    [
        [],  # copied format, no signature
        [f"{OURS} dkim=pass header.d=spammer.example"],  # signed, by someone else
        ["Authentication-Results: mx.spammer.example; dkim=pass header.d=denwa-daiko.example.com"],
    ],
)
def test_a_copy_of_the_answering_service_format_gets_no_priority_and_no_callback_route(
    routed, headers
):
    raw = with_headers(ANSWERING_SERVICE, *headers)
    ticket = ticket_of(routed, raw, Envelope(source="lmtp", peer="127.0.0.1"))
    assert (ticket.source_kind, ticket.priority, ticket.assignee) != ("phone", "high", "yamada")
    assert ticket.source_kind == "email" and ticket.priority == "normal"
    assert ticket.fields[HINT]["template"] == "answering-service"  # shown, as a hint
    assert ticket.fields[HINT]["requester_company"] == "株式会社サクラ酒販"
    assert ticket.requester_email == "uketsuke@denwa-daiko.example.com"


def test_the_signed_answering_service_still_gets_its_callback_route(routed):
    raw = with_headers(ANSWERING_SERVICE, GATEWAY_SIGNED)
    ticket = ticket_of(routed, raw, Envelope(source="lmtp", peer="127.0.0.1"))
    assert (ticket.source_kind, ticket.priority, ticket.assignee) == ("phone", "high", "yamada")
    assert ticket.requester_company == "株式会社サクラ酒販"


def test_the_fax_gateway_logged_in_as_faxgw_is_bound(routed):
    raw = (DATA / "fax-gateway-pdf.eml").read_bytes().split(b"\r\n", 2)[2]
    unbound = ticket_of(routed, raw, Envelope(source="smtp", peer="198.51.100.80"))
    assert unbound.source_kind == "email"
    bound = with_headers(raw, "X-Resent: 1")  # another message: not a duplicate of the first
    envelope = Envelope(source="smtp", peer="198.51.100.80", extra={"auth_user": "faxgw"})
    ticket = ticket_of(routed, bound.replace(b"fax-20261122", b"fax-20261123"), envelope)
    assert (ticket.source_kind, ticket.assignee) == ("fax", "sato")


@pytest.mark.parametrize(
    ("envelope", "proven"),
    [
        (Envelope(source="smtp", peer="192.0.2.7"), True),
        (Envelope(source="lmtp", peer="::ffff:192.0.2.7"), True),  # a dual-stack listener
        (Envelope(source="smtp", peer="198.51.100.7"), False),
        (Envelope(source="imap", peer="192.0.2.7"), False),  # IMAP's peer is the server
        (Envelope(source="smtp", peer="198.51.100.7", extra={"auth_user": "faxgw"}), True),
        (Envelope(source="smtp", peer="198.51.100.7", extra={"auth_user": "other"}), False),
    ],
)
def test_a_gateway_is_proven_by_its_network_or_its_login(envelope, proven):
    binding = Binding(client_networks=["192.0.2.0/24"], smtp_users=["faxgw"])
    assert binding.proven(envelope, [], OUR_MTA) is proven


def test_results_are_read_past_nested_comments_and_quoted_strings():
    value = (
        f"{OUR_MTA} 1 (a (nested; comment) here); dkim=pass (sig; ok) "
        'header.d="denwa-daiko.example.com" header.b=x; spf=pass smtp.mailfrom=gw@faxgw.example.net'
    )
    results = trusted_results([("Authentication-Results", value)], OUR_MTA)
    assert [(r.method, r.result, r.domain()) for r in results] == [
        ("dkim", "pass", "denwa-daiko.example.com"),
        ("spf", "pass", "faxgw.example.net"),
    ]
