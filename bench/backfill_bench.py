"""Backfill end to end: `mailintake ingest` of the seeded mixed corpus as one mbox, into SQLite.

    .venv/bin/python bench/backfill_bench.py [--messages 2000] [--seed 1] [--rounds 1]
        [--tree DIR ...] [--large-mb 0]

The corpus is `growth_bench.Corpus` (Japanese and English inquiries, ISO-2022-JP, HTML, the
answering-service, FAX and web-form templates with 20-400 KB attachments, about 30 % replies,
re-deliveries, auto-replies), written once as an mbox. Each `--tree` (a checkout of the project,
e.g. one made with `git archive <commit> | tar -x -C DIR`; default: this one) runs
`mailintake ingest` on it in a fresh SQLite file, in a child process with that tree's code,
config.yaml, rules and templates; trees take turns per round, so load on the machine falls on
each alike. Printed per run: wall time, messages per second, CPU time per message (user +
system: less disturbed by other load than wall time), the peak RSS, the load average, and each
tree's medians against the first tree's.

`--large-mb N` also writes an mbox of about N MB (the corpus with fresh Message-IDs) and reports
the peak RSS and rate of reading it as `ingest` does (`MessageSource`, in ledger batches) with
this tree, and with `--large-ingest` of ingesting it whole with the last tree (at tens of
messages per second that takes long); the file is deleted afterwards.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import mailbox
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from growth_bench import Corpus

HERE = Path(__file__).resolve().parents[1]


def write_mbox(path: Path, count: int, seed: int) -> int:
    """The first `count` mails of the seeded corpus as an mbox; returns its size in bytes."""
    corpus, box = Corpus(seed), mailbox.mbox(path)
    for _ in range(count):
        box.add(corpus.next().raw)
    box.close()
    return path.stat().st_size


def write_large_mbox(path: Path, megabytes: int, seed: int) -> int:
    """About `megabytes` MB of corpus mail, streamed to the file, each with its own Message-ID."""
    corpus, written, n = Corpus(seed), 0, 0
    with path.open("wb") as out:
        while written < megabytes * 1_000_000:
            raw = corpus.next().raw.replace(b"Message-ID: <", f"Message-ID: <big{n}.".encode(), 1)
            chunk = b"From bench@example.com Mon Dec  1 00:00:00 2026\n" + raw.replace(
                b"\nFrom ", b"\n>From "
            )
            out.write(chunk + b"\n\n")
            written, n = written + len(chunk), n + 1
    return n


def ingest(tree: Path, mbox: Path, folder: Path) -> tuple[float, float, float, str]:
    """Run `mailintake ingest` with `tree`'s code: wall seconds, CPU seconds (user + system),
    peak RSS MB, and its summary."""
    db = folder / f"backfill-{time.monotonic_ns()}.db"
    env = {**os.environ, "MAILINTAKE_DATABASE__URL": f"sqlite:///{db}"}
    command = [sys.executable, "-c", "import cli; cli.main()", "--config", "config.yaml"]
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(u.ru_utime + u.ru_stime, u.ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *command, "ingest", "--json", str(mbox)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{tree}: ingest failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu, rss_kb = done.stderr.strip().splitlines()[-1].split()
    return elapsed, float(cpu), int(rss_kb) / 1024, " ".join(done.stdout.split())


# Peak RSS from VmHWM: ru_maxrss of a child forked from this (large) process would include ours.
READ = """
import sys, time
from sources.backfill import batches
from sources.files import MessageSource
start = time.perf_counter()
source = MessageSource(sys.argv[1])
count = sum(len(batch) for batch in batches(source))
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(count, time.perf_counter() - start, hwm)
"""


def read_large(mbox: Path) -> None:
    """Read the mbox as ingest does, without storing: peak RSS and messages per second."""
    done = subprocess.run(
        [sys.executable, "-c", READ, str(mbox)], cwd=HERE, capture_output=True, text=True
    )
    count, seconds, rss_kb = done.stdout.split()
    print(
        f"large mbox {mbox.stat().st_size / 1e6:.0f} MB, {count} mails read in ledger batches: "
        f"{float(seconds):.0f} s, {int(count) / float(seconds):.0f} msg/s, "
        f"peak RSS {int(rss_kb) / 1024:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tree", type=Path, action="append", help="project checkout to run")
    parser.add_argument("--large-mb", type=int, default=0)
    parser.add_argument("--large-ingest", action="store_true")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree or [HERE]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = write_mbox(folder / "mixed.mbox", args.messages, args.seed)
        print(f"mixed corpus: {args.messages} mails, {size / 1e6:.0f} MB; {os.cpu_count()} CPUs")
        rates: dict[Path, list[float]] = {t: [] for t in trees}
        cpus: dict[Path, list[float]] = {t: [] for t in trees}
        for round_ in range(1, args.rounds + 1):
            for tree in trees:
                load = os.getloadavg()[0]
                seconds, cpu, rss, summary = ingest(tree, folder / "mixed.mbox", folder)
                rates[tree].append(args.messages / seconds)
                cpus[tree].append(cpu * 1000 / args.messages)
                print(
                    f"round {round_} {tree}: {seconds:.1f} s, {rates[tree][-1]:.1f} msg/s, "
                    f"CPU {cpus[tree][-1]:.1f} ms/msg, peak RSS {rss:.0f} MB, "
                    f"load {load:.1f} -> {os.getloadavg()[0]:.1f}; {summary}"
                )
        first = statistics.median(rates[trees[0]] or [1.0])
        first_cpu = statistics.median(cpus[trees[0]] or [1.0])
        for tree in (t for t in trees if rates[t]):
            median, cpu = statistics.median(rates[tree]), statistics.median(cpus[tree])
            print(
                f"median {tree}: {median:.1f} msg/s ({median / first:.2f}x the first), "
                f"CPU {cpu:.1f} ms/msg ({cpu / first_cpu:.2f}x)"
            )
        if args.large_mb:
            big = folder / "large.mbox"
            count = write_large_mbox(big, args.large_mb, args.seed)
            read_large(big)
            if args.large_ingest:
                seconds, _cpu, rss, summary = ingest(trees[-1], big, folder)
                print(
                    f"large mbox ingested: {seconds:.0f} s, {count / seconds:.1f} msg/s, "
                    f"peak RSS {rss:.0f} MB; {summary}"
                )
            big.unlink()


if __name__ == "__main__":
    main()
