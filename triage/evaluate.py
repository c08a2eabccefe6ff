"""`triage eval`: a time-ordered hold-out (train on the older tickets, test on the newer), the
model's figures next to two baselines: the rules alone and always the most common class."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from storage.repo import LabelledTicket
from triage.model import Guess
from triage.store import fit, ticket_documents

TARGETS = ("category", "assignee")
NONE = "(none)"

# What the rules alone decide for a stored ticket's raw mail: (category, assignee).
RulesBaseline = Callable[[LabelledTicket], tuple[str | None, str | None]]


@dataclass
class Scores:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # precision, recall, f1, support


@dataclass
class TargetReport:
    labels: list[str]
    model: Scores
    most_common: Scores
    rules: Scores | None
    confusion: list[list[int]]  # rows: truth, columns: the model's guess, both in `labels`


@dataclass
class Report:
    trained_on: int
    tested_on: int
    train_seconds: float
    predict_ms_per_message: float
    # CPU time too: on a busy machine the wall-clock figures measure the neighbours.
    train_cpu_seconds: float
    predict_cpu_ms_per_message: float
    targets: dict[str, TargetReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split(
    tickets: Sequence[LabelledTicket], holdout: float
) -> tuple[list[LabelledTicket], list[LabelledTicket]]:
    """The older (1 - holdout) of the tickets, and the newer rest; tickets come oldest first."""
    cut = round(len(tickets) * (1 - holdout))
    return list(tickets[:cut]), list(tickets[cut:])


def score(truth: Sequence[str], guessed: Sequence[str], labels: Sequence[str]) -> Scores:
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, guessed, labels=list(labels), zero_division=0
    )
    per_class = {
        label: {
            "precision": round(float(precision[i]), 3),
            "recall": round(float(recall[i]), 3),
            "f1": round(float(f1[i]), 3),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    right = sum(t == g for t, g in zip(truth, guessed, strict=True))
    macro = f1_score(truth, guessed, labels=list(labels), average="macro", zero_division=0)
    return Scores(round(right / max(len(truth), 1), 4), round(float(macro), 4), per_class)


def evaluate(
    tickets: Sequence[LabelledTicket],
    rules: RulesBaseline | None = None,
    holdout: float = 0.2,
    on_rules_progress: Callable[[], None] | None = None,
) -> Report:
    """Fit on the older tickets, score on the newer ones; `rules` routes a held-out ticket's
    raw mail with the rules alone (no suggestion)."""
    train, test = split(tickets, holdout)
    if not test:
        raise ValueError(f"{len(tickets)} ticket(s): too few to hold any out")
    started, cpu = time.perf_counter(), time.process_time()
    classifier = fit(train)
    train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    documents = ticket_documents(test)
    started, cpu = time.perf_counter(), time.process_time()
    guesses = [classifier.predict([d])[0] for d in documents]  # one at a time, as in the pipeline
    predict_ms = (time.perf_counter() - started) * 1000 / len(documents)
    predict_cpu_ms = (time.process_time() - cpu) * 1000 / len(documents)
    by_rules = []
    for ticket in test if rules else ():
        assert rules is not None
        by_rules.append(rules(ticket))
        if on_rules_progress:
            on_rules_progress()
    report = Report(
        len(train),
        len(test),
        round(train_seconds, 3),
        round(predict_ms, 3),
        round(train_cpu, 3),
        round(predict_cpu_ms, 3),
    )
    for index, target in enumerate(TARGETS):
        truth = [_label(getattr(t, target)) for t in test]
        model = [_label(_guessed(g[index])) for g in guesses]
        ruled = [_label(r[index]) for r in by_rules] if rules else None
        report.targets[target] = _target_report(
            truth, model, ruled, [_label(getattr(t, target)) for t in train]
        )
    return report


def _guessed(guess: Guess | None) -> str | None:
    return guess.label if guess else None


def _label(value: str | None) -> str:
    return value or NONE


def _target_report(
    truth: list[str], model: list[str], ruled: list[str] | None, trained: list[str]
) -> TargetReport:
    common = Counter(trained).most_common(1)[0][0]
    labels = sorted(set(truth) | set(model))
    return TargetReport(
        labels=labels,
        model=score(truth, model, labels),
        most_common=score(truth, [common] * len(truth), labels),
        rules=score(truth, ruled, labels) if ruled is not None else None,
        confusion=confusion_matrix(truth, model, labels=labels).tolist(),
    )
