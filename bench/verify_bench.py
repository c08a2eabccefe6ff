"""What mailintake's own verification (config `verify`) costs per message, DNS aside.

    .venv/bin/python bench/verify_bench.py [--messages 200]

`ingest.verify.results_header` over the same message, DNS answered from a dict (so the figure is
the CPU the checks take; a real lookup adds its network round trip, at most
`verify.dns_timeout_seconds`), for a DKIM-signed mail from a direct SMTP client (DKIM, SPF,
ARC, DMARC), the same mail unsigned, and `ingest.parse.parse` of it beside them for scale.
Process CPU time per message, with the machine's load. A benchmark, not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from collections.abc import Callable
from email.message import EmailMessage

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ingest.mail import Envelope
from ingest.parse import parse
from ingest.verify import results_header

DOMAIN = "wine-importer.example.jp"
SMTP = Envelope(source="smtp", mail_from=f"yamada@{DOMAIN}", peer="192.0.2.25")


def signed_mail() -> tuple[bytes, bytes, dict[str, str]]:
    """A signed mail, the same unsigned, and the DNS records that verify it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = f"yamada@{DOMAIN}", "inquiry@example.jp", "請求書"
    msg.set_content("ボルドーの在庫はありますか。\n" * 200)
    raw = msg.as_bytes()
    records = {
        f"s1._domainkey.{DOMAIN}": f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}",
        DOMAIN: "v=spf1 ip4:192.0.2.0/24 -all",
        f"_dmarc.{DOMAIN}": "v=DMARC1; p=reject",
    }
    return dkim.sign(raw, b"s1", DOMAIN.encode(), pem) + raw, raw, records


def cpu_ms(func: Callable[[], object], runs: int) -> float:
    func()  # the first call reads the public suffix list
    start = time.process_time()
    for _ in range(runs):
        func()
    return (time.process_time() - start) / runs * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    signed, unsigned, records = signed_mail()

    def dns(name: str, qtype: str) -> list[str]:
        found = records.get(name) if qtype == "TXT" else None
        return [found] if found else []

    parsed_signed, parsed_unsigned = parse(signed), parse(unsigned)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.messages} runs, {len(signed)} bytes")
    for label, func in (
        ("signed, SMTP", lambda: results_header(signed, parsed_signed, SMTP, "mx", dns)),
        ("unsigned, SMTP", lambda: results_header(unsigned, parsed_unsigned, SMTP, "mx", dns)),
        ("parse alone", lambda: parse(signed)),
    ):
        print(f"{label:16s} {cpu_ms(func, args.messages):6.2f} ms CPU per message")


if __name__ == "__main__":
    main()
