"""Parse speed over the shared corpus: `ingest.parse.parse` against mail-parser alone.

    .venv/bin/python bench/parse_bench.py [--corpus ../shared/corpus] [--runs 3]

Every message file of the corpus is read the way tests/test_corpus.py reads it (an mbox split
into its messages), all bytes are loaded first, then each parser runs over every message; the
median of the runs is printed as total seconds (process CPU time, which other work on a shared
machine disturbs less than wall-clock time, shown beside it) and messages per second. The
reference line is mail-parser's `parse_from_bytes` alone on the same bytes. A benchmark, not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mailparser

from ingest.parse import UnreadableMail, parse
from sources.files import MessageSource

EXPECTATION_FILES = {".yml", ".md"}  # as in tests/test_corpus.py: not messages
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def corpus_messages(root: Path) -> list[bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in EXPECTATION_FILES)
    return [item.raw for path in files for item in MessageSource(str(path))]


def ours(raw: bytes) -> None:
    with contextlib.suppress(UnreadableMail):  # the two files of the corpus that are no mail
        parse(raw)


def mail_parser_alone(raw: bytes) -> None:
    mailparser.parse_from_bytes(raw)


def timed(func: Callable[[bytes], None], messages: list[bytes], runs: int) -> tuple[float, float]:
    """Median CPU seconds and median wall-clock seconds of `runs` passes over `messages`."""
    cpu, wall = [], []
    for _ in range(runs):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for raw in messages:
            func(raw)
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not args.corpus.is_dir():
        raise SystemExit(f"corpus folder {args.corpus} is absent")
    logging.getLogger("mailparser").setLevel(logging.CRITICAL)  # it logs every odd header
    messages = corpus_messages(args.corpus)
    size = sum(map(len, messages)) / 1e6
    print(f"{len(messages)} messages, {size:.1f} MB, median of {args.runs} runs")
    for label, func in (
        ("ingest.parse.parse", ours),
        ("parse_from_bytes alone", mail_parser_alone),
    ):
        cpu, wall = timed(func, messages, args.runs)
        print(
            f"{label:24s} {cpu:6.2f} s CPU  {len(messages) / cpu:5.0f} msg/s"
            f"   (wall clock {wall:.2f} s)"
        )


if __name__ == "__main__":
    main()
