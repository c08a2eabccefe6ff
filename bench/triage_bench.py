"""The triage assistant on a generated history: training time, prediction time per message, and
the hold-out figures next to the rules alone and the most common class.

Generates a few thousand past tickets (bench/triage_corpus.py), stores them in a fresh SQLite
database as the pipeline would have, then runs what `mailintake triage eval` runs (train on the
older 80 %, test on the newer 20 %; the rules baseline routes the held-out raw mails with the
shipped rules.yaml) and `triage train` (the whole history, stored as version 1).

    .venv/bin/python bench/triage_bench.py [--tickets 3000] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.triage_corpus import generate, load_history
from config import Settings, load_settings
from ingest.extract import load_templates
from pipeline.context import PipelineContext
from pipeline.dryrun import rules_alone
from rules.load import load_rules
from storage import db, repo
from triage.evaluate import Report, evaluate
from triage.store import train

ROOT = Path(__file__).resolve().parents[1]


def run(count: int, seed: int, folder: Path) -> tuple[Report, dict[str, float]]:
    url = f"sqlite:///{folder / 'triage.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    settings = Settings(
        database={"url": url}, authserv_id=load_settings(ROOT / "config.yaml").authserv_id
    )
    ctx = PipelineContext(settings, sessions, templates=load_templates(ROOT / "templates.yaml"))
    started = time.perf_counter()
    history = generate(count, seed, authserv_id=settings.authserv_id)
    load_history(ctx, history)
    figures = {"history_seconds": time.perf_counter() - started}
    with sessions() as session:
        tickets = repo.labelled_tickets(session)
    decide = rules_alone(
        settings, sessions, load_rules(ROOT / "rules.yaml", settings.zone, settings.authserv_id)
    )
    report = evaluate(tickets, lambda t: decide(t.inbound_message_id))
    started = time.perf_counter()
    with sessions.begin() as session:
        trained = train(session, None)
    figures["train_all_seconds"] = time.perf_counter() - started
    figures["fit_all_seconds"] = trained.seconds
    figures["model_kib"] = trained.size / 1024
    engine.dispose()
    return report, figures


def show(report: Report, figures: dict[str, float]) -> None:
    print(
        f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )
    print(
        f"history: {report.trained_on + report.tested_on} tickets, stored in "
        f"{figures['history_seconds']:.1f} s"
    )
    print(
        f"hold-out: trained on {report.trained_on} in {report.train_seconds:.2f} s "
        f"({report.train_cpu_seconds:.2f} s CPU), tested on {report.tested_on}; predict "
        f"{report.predict_ms_per_message:.2f} ms/message "
        f"({report.predict_cpu_ms_per_message:.2f} ms CPU)"
    )
    print(
        f"train on all, store as a version: {figures['train_all_seconds']:.2f} s "
        f"(fit {figures['fit_all_seconds']:.2f} s), model {figures['model_kib']:.0f} KiB"
    )
    for target, found in report.targets.items():
        print(f"\n{target:<22} {'model':>13} {'rules alone':>13} {'most common':>13}")
        rows = [found.model, found.rules, found.most_common]
        cells = [f"{s.accuracy:.3f}/{s.macro_f1:.3f}" if s else "-" for s in rows]
        print(f"{'accuracy/macro F1':<22} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13}")
        for label in found.labels:
            f1 = [f"{s.per_class[label]['f1']:.3f}" if s else "-" for s in rows]
            name = f"{label} (n={found.model.per_class[label]['support']})"
            print(f"{name:<22} {f1[0]:>13} {f1[1]:>13} {f1[2]:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report, figures = run(args.tickets, args.seed, Path(folder))
    if args.json:
        print(json.dumps({**report.to_dict(), **figures}, indent=2))
    else:
        show(report, figures)


if __name__ == "__main__":
    main()
