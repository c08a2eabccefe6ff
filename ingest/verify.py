"""mailintake's own DKIM, SPF, DMARC and ARC verdicts (config `verify`), for a setup where no
MTA in front writes Authentication-Results: mailintake as the MX, IMAP, files.

It runs in the parse stage (worker processes, never the listener's event loop) and writes one
`Authentication-Results: <authserv_id>; spf=...; dkim=...; arc=...; dmarc=...` on top of the
parsed headers, removing every header with our authserv-id that came with the mail
(`ingest.authres.with_own_results`); rules and template bindings then read it like an MTA's.
The raw bytes stay as received.

DKIM and ARC are `authheaders`' checks (on dkimpy), SPF is pyspf's, and DMARC is authheaders'
policy lookup with the alignment computed here (see `_dmarc`). All take their DNS from one
injectable `Resolver`, so tests run offline: dkimpy and authheaders take a `dnsfunc`, and
pyspf's `query.dns` is overridden (`_SpfQuery`), since pyspf otherwise calls its module-wide
resolver. Every lookup is bounded by
`verify.dns_timeout_seconds`; a failed lookup makes that method `temperror`, and no error of a
check leaves this module.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.resolver
import spf
from authheaders import check_arc, check_dkim
from authheaders.dmarc_lookup import lookup_receiver_record
from authres import (
    AuthenticationResultsHeader,
    DKIMAuthenticationResult,
    SPFAuthenticationResult,
)
from authres.arc import ARCAuthenticationResult
from authres.core import QuotableValue
from authres.dmarc import DMARCAuthenticationResult
from publicsuffix2 import PublicSuffixList

from config import Settings
from ingest.authres import HEADER, with_own_results
from ingest.mail import Envelope, IncomingMail, ParsedMail
from storage.states import Source

log = logging.getLogger(__name__)

# (name, qtype) -> the answers as text: a TXT record's strings joined, an address, "10 mx.host.",
# a PTR name; [] when the name or the type does not exist. Raises DnsTemporary otherwise.
Resolver = Callable[[str, str], list[str]]
# Only a direct SMTP client is the sending host; an LMTP client is the MTA that handed it on.
SPF_SOURCES = (Source.SMTP,)


class DnsTemporary(dns.exception.DNSException):
    """A lookup that timed out or found no working server: the checks say `temperror`.
    A DNSException, which authheaders' DKIM check maps to `temperror` by itself."""


def system_resolver(timeout: float) -> Resolver:
    """The host's resolver (/etc/resolv.conf, read now, not at import), each lookup bounded by
    `timeout` seconds in all."""
    resolver: dns.resolver.Resolver | None = None
    try:
        resolver = dns.resolver.Resolver()
        resolver.lifetime = timeout
    except dns.exception.DNSException as error:  # no /etc/resolv.conf: every lookup fails
        log.error("verify: no DNS resolver configured (%s); verdicts will be temperror", error)

    def lookup(name: str, qtype: str) -> list[str]:
        if resolver is None:
            raise DnsTemporary("no DNS resolver configured")
        try:
            answer = resolver.resolve(name, qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as error:
            raise DnsTemporary(f"{qtype} {name}: {error}") from None
        if qtype == "TXT":
            return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        return [r.to_text() for r in answer]

    return lookup


def verify(mail: IncomingMail, settings: Settings, dns: Resolver) -> None:
    """Put our own verdicts on top of `mail.parsed.headers` (see the module's docstring)."""
    ours = settings.authserv_id
    assert mail.parsed is not None and ours, "verify after parse, with an authserv_id"
    value = results_header(mail.raw, mail.parsed, mail.envelope, ours, dns, settings.verify.arc)
    mail.parsed.headers = with_own_results(mail.parsed.headers, value, ours)


def results_header(
    raw: bytes,
    parsed: ParsedMail,
    envelope: Envelope,
    authserv_id: str,
    dns: Resolver,
    arc: bool = True,
) -> str:
    """The value of our Authentication-Results header for a message (without the name)."""
    spf_result = check_spf(envelope, dns)
    signed = any(name.lower() == "dkim-signature" for name, _ in parsed.headers)
    dkim_result = _dkim(raw, dns) if signed else DKIMAuthenticationResult(result="none")
    results: list[Any] = [spf_result, dkim_result]
    if arc:
        results.append(_arc(raw, dns))
    from_domain = (parsed.from_email or "").rpartition("@")[2].strip(".").lower()
    spf_passed = spf_result.result == "pass"
    spf_domain = (envelope.mail_from or "").rpartition("@")[2] or envelope.extra.get("helo")
    results.append(_dmarc(from_domain, spf_domain if spf_passed else None, dkim_result, dns))
    for result in results:
        _defuse(result)
    text = str(AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    return text.partition(":")[2].strip() if text.lower().startswith(HEADER) else text


def check_spf(envelope: Envelope, dns: Resolver) -> Any:
    """SPF for the client address, HELO and MAIL FROM of a direct SMTP client; `none` for mail
    without one (LMTP, IMAP, files: no sending host is known)."""
    helo = envelope.extra.get("helo") or None
    mail_from = envelope.mail_from or None
    if envelope.source not in SPF_SOURCES or not envelope.peer:
        return SPFAuthenticationResult(result="none", smtp_mailfrom=mail_from, smtp_helo=helo)
    try:
        result, _code, reason = _SpfQuery(dns, envelope.peer, mail_from or "", helo or "").check()
    except Exception as error:  # pyspf raises on odd input; a verdict, never a failed stage
        result, reason = "temperror", str(error)
    return SPFAuthenticationResult(
        result=result, reason=reason, smtp_mailfrom=mail_from, smtp_helo=helo
    )


class _SpfQuery(spf.query):  # type: ignore[misc]
    """pyspf's query with its lookups from our resolver. dnspython already follows CNAMEs,
    so only the cache and the void-lookup limit (RFC 7208 4.6.4) of pyspf's `dns` remain."""

    def __init__(self, dns: Resolver, ip: str, mail_from: str, helo: str) -> None:
        super().__init__(ip, mail_from, helo)
        self.resolve = dns

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> Any:
        name = str(name).rstrip(".").lower()
        key = (name, qtype)
        if key not in self.cache:
            try:
                answers = self.resolve(name, qtype)
            except DnsTemporary as error:
                raise spf.TempError(f"DNS {error}") from None
            self.cache[key] = [_spf_answer(qtype, a) for a in answers]
        result = self.cache[key]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError("Void lookup limit exceeded")
        return result


def _spf_answer(qtype: str, text: str) -> Any:
    """An answer in the shape pyspf's own lookups give it."""
    if qtype in ("TXT", "SPF"):
        return [text.encode()]
    if qtype == "MX":
        preference, _, exchange = text.partition(" ")
        return (int(preference), exchange.rstrip("."))
    return text.rstrip(".")


def _dkim(raw: bytes, dns: Resolver) -> Any:
    """The first DKIM signature's verdict; DMARC aligns with it."""
    try:
        return check_dkim(raw, dnsfunc=_dkim_txt(dns))
    except Exception as error:  # authheaders' own handling can fail on odd input
        return DKIMAuthenticationResult(result="temperror", result_comment=_comment(error))


def _arc(raw: bytes, dns: Resolver) -> Any:
    try:
        return check_arc(raw, dnsfunc=_dkim_txt(dns))
    except Exception as error:
        return ARCAuthenticationResult(result="temperror", result_comment=_comment(error))


def _dmarc(from_domain: str, spf_domain: str | None, dkim_result: Any, dns: Resolver) -> Any:
    """DMARC (RFC 7489): the policy record of the From domain, else of its organizational
    domain (read by authheaders), and a pass when SPF or DKIM passed for a domain aligned with
    From. Discovery and alignment are done here: authheaders' own (`check_dmarc`) reads a
    domain only up to its first hyphen (`wine-importer.example.jp` as `wine`), and reads the
    public suffix list anew for each organizational domain (60 ms)."""
    if not from_domain:
        return DMARCAuthenticationResult(result="none", result_comment="no From domain")
    try:
        record = _policy_record(from_domain, _dmarc_txt(dns))
    except DnsTemporary as error:
        return _dmarc_result("temperror", from_domain, comment=_comment(error))
    except Exception as error:  # a malformed record
        return _dmarc_result("permerror", from_domain, comment=_comment(error))
    if not record or not record.get("p"):
        return _dmarc_result("none", from_domain)
    dkim_domain = dkim_result.header_d if dkim_result.result == "pass" else None
    passed = _aligned(from_domain, spf_domain, record.get("aspf", "r")) or _aligned(
        from_domain, dkim_domain, record.get("adkim", "r")
    )
    return _dmarc_result("pass" if passed else "fail", from_domain, policy=record["p"])


def _dmarc_result(
    result: str, from_domain: str, policy: str | None = None, comment: str | None = None
) -> Any:
    return DMARCAuthenticationResult(
        result=result, result_comment=comment, header_from=from_domain, policy=policy
    )


def _aligned(from_domain: str, domain: str | None, mode: str) -> bool:
    """Whether an authenticated `domain` is aligned with From: the same name (`s`), or the same
    organizational domain (`r`, relaxed, the default)."""
    if not domain:
        return False
    domain = domain.strip(".").lower()
    if mode == "s" or domain == from_domain:
        return domain == from_domain
    return _org_domain(domain) == _org_domain(from_domain)


def _policy_record(from_domain: str, txt: Callable[[str], str | None]) -> dict[str, str]:
    record: dict[str, str] = lookup_receiver_record(from_domain, txt)
    org = _org_domain(from_domain)
    if not record and org != from_domain:
        record = lookup_receiver_record(org, txt)
    return record


def _org_domain(domain: str) -> str:
    """The organizational domain, by the public suffix list authheaders ships."""
    return str(_suffix_list().get_public_suffix(domain))


@functools.cache
def _suffix_list() -> PublicSuffixList:
    """Read once per process, on first use."""
    path = importlib.resources.files("authheaders") / "public_suffix_list.txt"
    with path.open(encoding="utf-8") as lines:
        return PublicSuffixList(lines)


def _dkim_txt(dns: Resolver) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc(name, timeout=)`: the first TXT record as bytes; our resolver bounds
    the time."""

    def txt(name: bytes | str, timeout: float = 0) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answers = dns(text.rstrip("."), "TXT")
        return answers[0].encode() if answers else None

    return txt


def _dmarc_txt(dns: Resolver) -> Callable[[str], str | None]:
    """authheaders' DMARC `dnsfunc(name)`: the one `v=DMARC1` TXT record as text; none when
    there are several (RFC 7489 6.6.3)."""

    def txt(name: str) -> str | None:
        dmarc = [a for a in dns(name.rstrip("."), "TXT") if a.startswith("v=DMARC1")]
        return dmarc[0] if len(dmarc) == 1 else None

    return txt


def _defuse(result: Any) -> None:
    """Keep the sender's words from writing results of their own into our header: a MAIL FROM,
    HELO, signature tag or SPF explanation (`exp=`, the sender's DNS) holding `;dkim=pass`
    would otherwise read as another clause. Properties that are not one plain token are left
    out; comments and reasons keep only harmless characters."""
    result.properties = [p for p in result.properties if _plain(str(p.value or ""))]
    for name in ("result_comment", "reason_comment"):
        if getattr(result, name, None):
            setattr(result, name, _words(str(getattr(result, name))))
    if result.reason:  # authres leaves a value with an `@` unquoted
        result.reason = QuotableValue(_words(str(result.reason)))


def _plain(value: str) -> bool:
    return bool(value) and all(32 < ord(c) < 127 and c not in UNSAFE for c in value)


UNSAFE = frozenset(';()"\\')


def _words(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in UNSAFE else " " for c in text)[:200]


def _comment(error: Exception) -> str:
    """An error as an Authentication-Results comment."""
    return _words(f"{type(error).__name__}: {error}")
