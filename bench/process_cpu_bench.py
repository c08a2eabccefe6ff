"""CPU per message of intake and of processing alone, without the process start-up and the
mbox reading that `backfill_bench.py` also counts.

    .venv/bin/python bench/process_cpu_bench.py [--messages 1000] [--seed 1] [--rounds 3]
        [--tree DIR ...]

The seeded mixed corpus of `growth_bench.Corpus` (as `backfill_bench.py`), in a fresh SQLite
file per run with each `--tree`'s code, config.yaml, rules and templates (default: this tree),
in a child process; trees take turns per round. Per run: the CPU time (user + system, of the
child process) of `receive_batch` in batches of 100 and of `process_pending`, per message, the
fates, and the load average; then each tree's medians against the first tree's. A benchmark,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from growth_bench import Corpus

HERE = Path(__file__).resolve().parents[1]
RUNS = itertools.count()  # numbers the database files

# Run in the child, with the tree's code: argv = mails file, database file.
CHILD = """
import collections, json, pickle, sys, time
from pathlib import Path
from config import load_settings
from ingest.intake import receive_batch
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process_pending
from storage import db

mails = pickle.loads(Path(sys.argv[1]).read_bytes())
url = f"sqlite:///{sys.argv[2]}"
settings = load_settings(Path("config.yaml"))
settings.database.url = url
engine = db.make_engine(url)
db.upgrade(engine)
sessions = db.make_session_factory(engine)
envelope = Envelope(source="file")
start = time.process_time()
for at in range(0, len(mails), 100):
    receive_batch(sessions, [(raw, envelope) for raw in mails[at : at + 100]])
received = time.process_time()
fates = collections.Counter()
process_pending(PipelineContext(settings, sessions), lambda fate: fates.update([str(fate)]))
done = time.process_time()
print(json.dumps({"intake": received - start, "processing": done - received, "fates": fates}))
"""


def run(tree: Path, mails: Path, folder: Path, count: int) -> tuple[float, float, str]:
    """Intake and processing CPU milliseconds per message with `tree`'s code, and the fates."""
    database = folder / f"cpu-{next(RUNS)}.db"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(mails), str(database)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    fates = json.dumps(dict(sorted(figures["fates"].items())))
    return figures["intake"] * 1000 / count, figures["processing"] * 1000 / count, fates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, action="append")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [HERE]]
    corpus = Corpus(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mails = folder / "mails.pickle"
        mails.write_bytes(pickle.dumps([corpus.next().raw for _ in range(args.messages)]))
        results: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
        print(f"mixed corpus: {args.messages} mails; {os.cpu_count()} CPUs")
        for round_ in range(1, args.rounds + 1):
            for tree in trees:
                before = os.getloadavg()[0]
                intake, processing, fates = run(tree, mails, folder, args.messages)
                results[tree].append((intake, processing))
                print(
                    f"round {round_} {tree}: intake {intake:.2f} ms/msg, processing "
                    f"{processing:.2f} ms/msg CPU, load {before:.1f} -> {os.getloadavg()[0]:.1f}; "
                    f"{fates}"
                )
        first_intake, first_processing = (
            statistics.median(r[i] for r in results[trees[0]]) for i in (0, 1)
        )
        for tree in trees:
            intake = statistics.median(r[0] for r in results[tree])
            processing = statistics.median(r[1] for r in results[tree])
            print(
                f"median {tree}: intake {intake:.2f} ms/msg ({intake / first_intake:.2f}x), "
                f"processing {processing:.2f} ms/msg ({processing / first_processing:.2f}x)"
            )


if __name__ == "__main__":
    main()
