"""What proves a template mail came from its gateway: a template's `bound_to`.

A template's `match` reads From, Subject and body, which anyone can write; copying the
answering service's format must not make a mail a phone call with high priority. So a template
sets the source kind only when the mail also carries a proof its gateway cannot be imitated in:
the SMTP/LMTP client's address (`client_networks`), the name it logged in with (`smtp_users`),
or a DKIM/SPF/DMARC pass for the gateway's domain in the Authentication-Results our own MTA
wrote (`dkim`, `spf`, `dmarc`; see ingest.authres). Any one proof given is enough. A match
without a proof (an unbound template, or a bound one whose proof is missing) is only a hint:
`ingest.extract` records it beside the fields and leaves the mail an ordinary `email`.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

from ingest.authres import passed_for, trusted_results
from ingest.mail import Envelope
from storage.states import Source

AUTH_METHODS = ("dkim", "spf", "dmarc")
# Only these sources have a client address of their own; IMAP's `peer` is the server's name.
CLIENT_SOURCES = (Source.SMTP, Source.LMTP)


class Binding(BaseModel):
    """The gateway a template trusts; any one of the proofs given is enough."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, description="the SMTP/LMTP client's address is in one of these"
    )
    smtp_users: list[str] = Field(
        default_factory=list, description="the client logged in (SMTP AUTH) as one of these"
    )
    dkim: list[str] = Field(default_factory=list, description="dkim=pass for one of these")
    spf: list[str] = Field(default_factory=list, description="spf=pass for one of these")
    dmarc: list[str] = Field(default_factory=list, description="dmarc=pass for one of these")

    @model_validator(mode="after")
    def _not_empty(self) -> Binding:
        if not self.wanted():
            raise ValueError("give at least one of client_networks, smtp_users, dkim, spf, dmarc")
        return self

    def domains(self, method: str) -> list[str]:
        domains: list[str] = getattr(self, method)
        return domains

    def proven(
        self, envelope: Envelope, headers: list[tuple[str, str]], authserv_id: str | None
    ) -> bool:
        """True if the envelope or our MTA's Authentication-Results (`authserv_id`) show the
        mail came from the gateway."""
        if envelope.source in CLIENT_SOURCES and _in_networks(envelope.peer, self.client_networks):
            return True
        if envelope.extra.get("auth_user") in self.smtp_users:
            return True
        wanted = [m for m in AUTH_METHODS if self.domains(m)]
        results = trusted_results(headers, authserv_id) if wanted else []
        return any(passed_for(results, m, self.domains(m)) for m in wanted)

    def wanted(self) -> str:
        """The proofs in words, for explanations."""
        words = []
        if self.client_networks:
            words.append(f"client in {', '.join(map(str, self.client_networks))}")
        if self.smtp_users:
            words.append(f"smtp user {', '.join(self.smtp_users)}")
        for method in AUTH_METHODS:
            if self.domains(method):
                words.append(f"{method}=pass for {', '.join(self.domains(method))}")
        return " or ".join(words)


def _in_networks(peer: str | None, networks: list[IPv4Network | IPv6Network]) -> bool:
    try:
        address = ip_address(peer or "")
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:192.0.2.7 on a dual-stack listener
    return any(address in network for network in networks)
