"""Routing cost per message with 10, 100 and 500 rules: indexed (as routed) against linear.

Generates a rules file of varied rules (subject/body keywords, sender domains, RE2 regexes on
the body, headers, attachments, any/not combinations), none of which matches the sample mails,
so every message goes through every rule (the worst case) before the final catch-all. `linear`
tries each rule in turn (the evaluation before the index); `indexed` tries only the index's
candidates. Both give the same decision, checked on every sample.

    .venv/bin/python bench/rules_bench.py [--rules 10,100,500] [--messages 2000]
"""

from __future__ import annotations

import argparse
import os
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
from rules.engine import CompiledRules, evaluate
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


def compiled(count: int) -> tuple[CompiledRules, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.yaml"
        path.write_text(rules_text(count), encoding="utf-8")
        start = time.perf_counter()
        rules = load_rules(path)
        return rules, time.perf_counter() - start


def measure(count: int, mails: list[IncomingMail], messages: int) -> None:
    rules, load_seconds = compiled(count)
    for mail in mails:
        linear, indexed = evaluate(rules, mail, linear=True), evaluate(rules, mail)
        assert linear.plan == indexed.plan and indexed.plan.rule_hits == ["catch-all"]
    before = per_message(lambda m: evaluate(rules, m, linear=True), mails, messages)
    after = per_message(lambda m: evaluate(rules, m), mails, messages)
    explained = per_message(lambda m: evaluate(rules, m, explain=True), mails, messages // 4)
    print(
        f"{count:5d} {load_seconds * 1000:9.0f} {before * 1000:10.3f} {after * 1000:11.3f} "
        f"{before / after:6.1f}x {explained * 1000:12.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="10,100,500", help="rule counts, comma-separated")
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    mails = sample_mails()
    print(f"{len(mails)} sample mails, load average {os.getloadavg()[0]:.1f}; ms per message")
    print("rules   load ms  linear ms  indexed ms  ratio  explained ms")
    for count in (int(n) for n in args.rules.split(",")):
        measure(count, mails, args.messages)


if __name__ == "__main__":
    main()
