"""mailintake's own verification (config `verify`, issue #12 item 11): DKIM, SPF and DMARC
computed here, offline against a DNS served from a dict, and written under our authserv-id so
the shipped rule and the template bindings read it; a forged header with our id never counts."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.authres import trusted_results, verdicts
from ingest.extract import HINT, load_templates
from ingest.intake import receive, unstored_mail
from ingest.mail import Envelope
from ingest.parse import parse
from ingest.verify import DnsTemporary, Resolver, verify
from pipeline.process import PipelineContext, process
from rules.engine import RulesRouter
from storage.models import InboundMessage, Ticket
from storage.states import Fate
from tests.conftest import DATA
from tests.mails import simple_mail
from tests.rulesets import OUR_MTA, shipped_rules
from tests.rulesets import TUESDAY_10_JST as TUESDAY

ROOT = Path(__file__).resolve().parents[2]
OWN = "wine-importer.example.jp"
GATEWAY = "denwa-daiko.example.com"
SPOOFED = f"sender claims {OWN} but fails DMARC"
FORGED_PASS = (
    f"Authentication-Results: {OUR_MTA}; spf=pass; dkim=pass header.d={GATEWAY}; dmarc=pass"
)


# --- no network: every test here runs against the dict below ------------------------------------


@pytest.fixture(autouse=True)
def offline(no_network: list[Any]) -> Iterator[None]:
    """Every test here: the network guard, and a failure if anything tried the network."""
    yield
    assert no_network == [], f"the network was touched: {no_network}"


def test_the_network_guard_refuses_a_name_lookup(no_network: list[str]) -> None:
    with pytest.raises(OSError, match="no network"):
        socket.create_connection(("example.com", 53))
    assert no_network
    no_network.clear()  # seen: the guard works; nothing else may reach the network


# --- keys and a DNS from a dict -----------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    """A fresh RSA key: the private key (PEM) to sign with, the public one as a DKIM record."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def fake_dns(records: dict[str, str]) -> tuple[Resolver, list[str]]:
    """A resolver serving TXT records from `records`; every other name or type has no answer.
    Also returns the names asked, in order."""
    asked: list[str] = []

    def lookup(name: str, qtype: str) -> list[str]:
        asked.append(f"{qtype} {name}")
        found = records.get(name.lower()) if qtype == "TXT" else None
        return [found] if found else []

    return lookup, asked


def zone(key_record: str) -> dict[str, str]:
    """Our domain and the answering service: both sign (selector `s1`), publish SPF and DMARC."""
    return {
        f"s1._domainkey.{OWN}": key_record,
        f"s1._domainkey.{GATEWAY}": key_record,
        OWN: "v=spf1 ip4:192.0.2.0/24 -all",
        GATEWAY: "v=spf1 ip4:203.0.113.10 -all",
        f"_dmarc.{OWN}": "v=DMARC1; p=reject",
        f"_dmarc.{GATEWAY}": "v=DMARC1; p=quarantine",
    }


def signed(raw: bytes, pem: bytes, domain: str) -> bytes:
    signature = dkim.sign(raw, b"s1", domain.encode(), pem, include_headers=[b"from", b"subject"])
    return signature + raw


VERIFYING = Settings(authserv_id=OUR_MTA, verify={"enabled": True})


def results(
    raw: bytes, envelope: Envelope, dns: Resolver, headers: tuple[str, ...] = ()
) -> dict[str, set[str]]:
    """The verdicts as rules read them, after our own verification wrote its header."""
    raw = "".join(f"{h}\r\n" for h in headers).encode() + raw
    mail = unstored_mail(raw, envelope, TUESDAY)
    mail.parsed = parse(raw)
    verify(mail, VERIFYING, dns)
    return verdicts(trusted_results(mail.parsed.headers, OUR_MTA))


FILE = Envelope(source="file")


def staff_mail(subject: str = "請求書の件") -> bytes:
    return simple_mail(sender=f"yamada@{OWN}", subject=subject)


# --- DKIM, SPF, DMARC -----------------------------------------------------------------------------


def test_a_signed_mail_passes_dkim_and_a_tampered_body_fails(key):
    pem, record = key
    dns, asked = fake_dns(zone(record))
    raw = signed(staff_mail(), pem, OWN)
    assert results(raw, FILE, dns)["dkim"] == {"pass"}
    assert f"TXT s1._domainkey.{OWN}" in asked
    tampered = raw.rstrip(b"\n") + b" (changed on the way)\n"
    assert results(tampered, FILE, dns)["dkim"] == {"fail"}


def test_an_unsigned_mail_has_dkim_none():
    dns, _ = fake_dns({})
    assert results(staff_mail(), FILE, dns)["dkim"] == {"none"}


@pytest.mark.parametrize(
    ("envelope", "verdict"),
    [
        (Envelope(source="smtp", mail_from=f"yamada@{OWN}", peer="192.0.2.25"), "pass"),
        (Envelope(source="smtp", mail_from=f"yamada@{OWN}", peer="198.51.100.80"), "fail"),
        # HELO alone when the envelope sender is empty (a bounce)
        (Envelope(source="smtp", mail_from="", peer="192.0.2.25", extra={"helo": OWN}), "pass"),
        # no sending host of its own: LMTP's client is the MTA, IMAP and files have none
        (Envelope(source="lmtp", mail_from=f"yamada@{OWN}", peer="192.0.2.25"), "none"),
        (Envelope(source="imap", peer="imap.example.jp"), "none"),
        (FILE, "none"),
    ],
)
def test_spf_judges_the_smtp_client_address(key, envelope, verdict):
    dns, _ = fake_dns(zone(key[1]))
    assert results(staff_mail(), envelope, dns)["spf"] == {verdict}


SMTP_FROM_OUTSIDE = Envelope(source="smtp", mail_from="bounce@spammer.example", peer="198.51.100.8")


@pytest.mark.parametrize(
    ("signer", "envelope", "verdict"),
    [
        (OWN, SMTP_FROM_OUTSIDE, "pass"),  # DKIM aligned with From
        (None, Envelope(source="smtp", mail_from=f"a@{OWN}", peer="192.0.2.9"), "pass"),  # SPF
        (GATEWAY, SMTP_FROM_OUTSIDE, "fail"),  # signed, by another domain: not aligned
        (None, SMTP_FROM_OUTSIDE, "fail"),
        (None, FILE, "fail"),
    ],
)
def test_dmarc_passes_only_with_an_aligned_pass(key, signer, envelope, verdict):
    pem, record = key
    dns, _ = fake_dns(zone(record))
    raw = signed(staff_mail(), pem, signer) if signer else staff_mail()
    assert results(raw, envelope, dns)["dmarc"] == {verdict}


def test_a_domain_without_dmarc_gets_none(key):
    dns, _ = fake_dns({})
    assert results(simple_mail(sender="a@example.org"), FILE, dns)["dmarc"] == {"none"}


@pytest.mark.parametrize(
    ("dmarc_record", "verdict"), [("p=reject", "pass"), ("p=reject; adkim=s", "fail")]
)
def test_a_subdomain_takes_the_organizational_record_and_its_alignment_mode(
    key, dmarc_record, verdict
):
    pem, record = key
    # wine-importer.example.jp is itself below the organizational domain example.jp
    dns, asked = fake_dns({**zone(record), "_dmarc.example.jp": f"v=DMARC1; {dmarc_record}"})
    raw = signed(simple_mail(sender=f"shop@news.{OWN}"), pem, OWN)
    assert results(raw, FILE, dns)["dmarc"] == {verdict}
    assert asked[-2:] == [f"TXT _dmarc.news.{OWN}", "TXT _dmarc.example.jp"]


def test_an_arc_chain_passes_and_a_change_after_it_fails(key):
    pem, record = key
    dns, _ = fake_dns({"s1._domainkey.lists.example.org": record})
    relayed = b"Authentication-Results: lists.example.org; spf=pass\r\n" + simple_mail()
    seal = dkim.arc_sign(
        relayed,
        b"s1",
        b"lists.example.org",
        pem,
        b"lists.example.org",
        include_headers=[b"from", b"subject", b"to"],
    )
    sealed = b"".join(seal) + relayed
    assert results(sealed, FILE, dns)["arc"] == {"pass"}
    assert results(sealed.replace(b"Subject: =?", b"Subject: X=?"), FILE, dns)["arc"] == {"fail"}
    assert results(simple_mail(), FILE, dns)["arc"] == {"none"}


def test_a_failing_dns_gives_temperror_and_no_exception(key):
    def broken(name: str, qtype: str) -> list[str]:
        raise DnsTemporary(f"{qtype} {name}: timed out")

    raw = signed(staff_mail(), key[0], OWN)
    smtp = Envelope(source="smtp", mail_from=f"yamada@{OWN}", peer="192.0.2.25")
    found = results(raw, smtp, broken)
    assert (found["dkim"], found["spf"], found["dmarc"]) == ({"temperror"},) * 3


def test_our_verdict_replaces_every_header_with_our_id_that_came_with_the_mail(key):
    dns, _ = fake_dns(zone(key[1]))
    smtp = Envelope(source="smtp", mail_from="x@spammer.example", peer="198.51.100.8")
    forged = (FORGED_PASS, f"Authentication-Results: {OUR_MTA}; iprev=pass")
    found = results(staff_mail(), smtp, dns, forged)
    assert found["dmarc"] == {"fail"} and found["dkim"] == {"none"}
    assert "iprev" not in found  # not even a method we do not check survives


@pytest.mark.parametrize(
    "envelope",
    [
        # authres writes a value with an `@` unquoted
        Envelope(source="smtp", mail_from="x;dmarc=pass;y@spammer.example", peer="198.51.100.8"),
        Envelope(
            source="smtp",
            mail_from=f'"x;dkim=pass header.d={GATEWAY}"@spammer.example',
            peer="198.51.100.8",
            extra={"helo": "a;dmarc=pass"},
        ),
    ],
)
def test_a_sender_cannot_write_results_into_our_header(key, envelope):
    # and its SPF explanation (`exp=`, from the sender's own DNS) becomes our `reason=`
    explained = {"spammer.example": "v=spf1 -all exp=why.spammer.example"}
    dns, _ = fake_dns({**zone(key[1]), **explained, "why.spammer.example": "a@b; dmarc=pass"})
    mail = unstored_mail(FORGED_PASS.encode() + b"\r\n" + staff_mail(), envelope, TUESDAY)
    mail.parsed = parse(mail.raw)
    verify(mail, VERIFYING, dns)
    results = trusted_results(mail.parsed.headers, OUR_MTA)
    assert sorted(r.method for r in results) == ["arc", "dkim", "dmarc", "spf"]
    assert [r.result for r in results if r.method != "spf"] == ["none", "none", "fail"]


def test_verify_needs_an_authserv_id():
    with pytest.raises(ValidationError, match=r"verify\.enabled needs authserv_id"):
        Settings(verify={"enabled": True})
    assert Settings(verify={"enabled": True}, authserv_id=OUR_MTA).verify.dns_timeout_seconds == 5


# --- through the pipeline: the shipped rule and a bound template ------------------------------


@pytest.fixture
def verifying(
    db_url: str, sessions: sessionmaker[Session], key: tuple[bytes, str]
) -> PipelineContext:
    settings = Settings(database={"url": db_url}, authserv_id=OUR_MTA, verify={"enabled": True})
    rules = shipped_rules()
    dns, _ = fake_dns(zone(key[1]))
    templates = load_templates(ROOT / "templates.yaml")
    return PipelineContext(
        settings, sessions, RulesRouter(lambda: rules), templates=templates, resolver=dns
    )


def outcome(ctx: PipelineContext, raw: bytes, envelope: Envelope) -> InboundMessage:
    inbound_id = receive(ctx.sessions, raw, envelope)
    process(ctx, inbound_id)
    with ctx.sessions() as session:
        row = session.get(InboundMessage, inbound_id)
        assert row is not None
        return row


def test_the_shipped_rule_drops_a_spoofed_own_domain_mail_despite_a_forged_pass(verifying):
    spoofed = FORGED_PASS.encode() + b"\r\n" + staff_mail()
    outsider = Envelope(source="smtp", mail_from=f"yamada@{OWN}", peer="198.51.100.80")
    row = outcome(verifying, spoofed, outsider)
    assert (row.status, row.drop_reason) == (Fate.DROPPED, SPOOFED)
    assert row.raw == spoofed  # the stored bytes stay as received


def test_a_signed_own_domain_mail_is_kept(verifying, key):
    raw = signed(staff_mail("見積の件"), key[0], OWN)
    outsider = Envelope(source="smtp", mail_from=f"yamada@{OWN}", peer="198.51.100.80")
    assert outcome(verifying, raw, outsider).status == Fate.TICKET


ANSWERING_SERVICE = (DATA / "answering-service.eml").read_bytes().split(b"\n", 2)[2]


def ticket_of(ctx: PipelineContext, raw: bytes, envelope: Envelope) -> Ticket:
    row = outcome(ctx, raw, envelope)
    with ctx.sessions() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.id == row.ticket_id)).one()
    return ticket


def test_the_answering_service_is_bound_by_our_own_dkim_verification(verifying, key):
    raw = signed(ANSWERING_SERVICE, key[0], GATEWAY)
    ticket = ticket_of(verifying, raw, Envelope(source="imap", peer="imap.example.jp"))
    assert (ticket.source_kind, ticket.priority, ticket.assignee) == ("phone", "high", "yamada")


def test_a_copy_with_a_forged_pass_under_our_id_is_only_a_hint(verifying):
    forged = f"Authentication-Results: {OUR_MTA}; dkim=pass header.d={GATEWAY}"
    raw = forged.encode() + b"\r\n" + ANSWERING_SERVICE
    ticket = ticket_of(verifying, raw, Envelope(source="imap", peer="imap.example.jp"))
    assert (ticket.source_kind, ticket.priority) == ("email", "normal")
    assert ticket.fields[HINT]["template"] == "answering-service"
