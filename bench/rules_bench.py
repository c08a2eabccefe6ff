"""Routing cost per message with 500 rules.

Generates a rules file of 500 varied rules (subject/body keywords, sender domains, RE2 regexes on
the body, headers, attachments, any/not combinations), none of which matches the sample mails,
so every message is tested against every rule (the worst case) before the final catch-all.

    .venv/bin/python bench/rules_bench.py [--rules 500] [--messages 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.intake import unstored_mail
from ingest.mail import Envelope, IncomingMail
from ingest.parse import parse
from rules.engine import evaluate
from rules.load import load_rules
from tests.mails import simple_mail

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"

SHAPES = [
    "{{subject: {{contains: [キーワード{i}, keyword-{i}]}}}}",
    "{{from: {{domain: [partner{i}.example.jp, shop{i}.example.com]}}}}",
    "{{body: {{regex: '注文番号\\s*X{i}-\\d+'}}}}",
    "{{header: {{name: X-Campaign, equals: 'c{i}'}}}}",
    "{{all: [{{attachment: {{name: {{ends_with: .x{i}}}}}}}, {{not: {{source_kind: fax}}}}]}}",
    "{{any: [{{subject: {{starts_with: 'T{i}:'}}}}, {{to: {{address: desk{i}@wine-importer.example.jp}}}}]}}",  # noqa: E501
]


def rules_text(count: int) -> str:
    lines = ["people: [yamada, sato, suzuki]", "rules:"]
    for i in range(count - 1):
        when = SHAPES[i % len(SHAPES)].format(i=i)
        lines.append(f"  - {{name: rule-{i}, when: {when}, then: {{category: c{i % 7}}}}}")
    lines.append("  - {name: catch-all, when: {always: true}, then: {assignee: yamada}}")
    return "\n".join(lines) + "\n"


def sample_mails() -> list[IncomingMail]:
    raws = [p.read_bytes() for p in sorted(DATA.glob("*.eml"))]
    raws.append(simple_mail(attachments=[("見積書.pdf", "application/pdf", b"%PDF-1.4")]))
    mails = []
    for raw in raws:
        mail = unstored_mail(raw, Envelope(source="file"), datetime.now(UTC))
        mail.parsed = parse(raw)
        mails.append(mail)
    return mails


def per_message(run: Callable[[IncomingMail], object], mails: list[IncomingMail], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        run(mails[i % len(mails)])
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=500)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.yaml"
        path.write_text(rules_text(args.rules), encoding="utf-8")
        start = time.perf_counter()
        rules = load_rules(path)
        load_seconds = time.perf_counter() - start
    mails = sample_mails()
    assert all(evaluate(rules, m).plan.rule_hits == ["catch-all"] for m in mails)
    # Facts are computed per message inside evaluate, so every run pays for normalising text.
    plain = per_message(lambda m: evaluate(rules, m), mails, args.messages)
    explained = per_message(lambda m: evaluate(rules, m, explain=True), mails, args.messages // 4)
    print(f"{len(rules.rules)} rules, {len(mails)} sample mails (each tried against every rule)")
    print(f"load + validate + compile: {load_seconds * 1000:.0f} ms")
    print(f"routing per message:           {plain * 1e6:8.0f} µs")
    print(f"routing with explanation:      {explained * 1e6:8.0f} µs  (rules test / rules diff)")


if __name__ == "__main__":
    main()
