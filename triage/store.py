"""Models in the store: train one from the tickets, save it as the next version, and load the
newest (every node loads the same one), cached per process by its sha256.

scikit-learn is imported only once a model is trained or loaded: importing it takes seconds,
and the pipeline imports this module in every `ingest` run and worker, with or without a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from ingest.mail import IncomingMail, Suggestion
from storage import repo
from storage.models import TriageModel
from triage.features import document, mail_document

if TYPE_CHECKING:
    from triage.model import Classifier


def ticket_documents(tickets: list[repo.LabelledTicket]) -> list[str]:
    return [document(t.subject, t.body, t.source_kind, t.fields) for t in tickets]


def fit(tickets: list[repo.LabelledTicket]) -> Classifier:
    """A classifier fitted on the tickets' current category and assignee."""
    from triage.model import Classifier

    return Classifier().fit(
        ticket_documents(tickets), [t.category for t in tickets], [t.assignee for t in tickets]
    )


@dataclass(frozen=True)
class Trained:
    version: int
    trained_on: int
    seconds: float
    categories: list[str]
    assignees: list[str]
    size: int  # bytes stored


def train(session: Session, since: datetime | None) -> Trained:
    """Fit on the tickets made since `since` and store the model as the next version."""
    from triage.model import dump

    tickets = repo.labelled_tickets(session, since)
    started = time.perf_counter()
    classifier = fit(tickets)
    seconds = time.perf_counter() - started
    data, digest = dump(classifier)
    assert classifier.category is not None
    assignees = classifier.assignee.classes if classifier.assignee else []
    row = TriageModel(
        trained_on=len(tickets),
        since=since,
        sha256=digest,
        model=data,
        details={
            "categories": classifier.category.classes,
            "assignees": assignees,
            "library": classifier.library,
            "features": len(classifier.features),
        },
    )
    version = repo.add_triage_model(session, row)
    return Trained(
        version, len(tickets), seconds, classifier.category.classes, assignees, len(data)
    )


class ModelCache:
    """The newest stored model, unpickled once per process and version."""

    def __init__(self) -> None:
        self._loaded: tuple[str, Classifier] | None = None

    def newest(self, session: Session) -> tuple[int, Classifier] | None:
        found = repo.newest_triage_model(session)
        if found is None:
            return None
        version, sha256 = found
        if self._loaded is None or self._loaded[0] != sha256:
            from triage.model import load

            self._loaded = (sha256, load(repo.triage_model_bytes(session, version), sha256))
        return version, self._loaded[1]


MODELS = ModelCache()


def suggest(mail: IncomingMail, session: Session) -> Suggestion | None:
    """What the newest stored model suggests for `mail`; None when no model was trained."""
    found = MODELS.newest(session)
    if found is None:
        return None
    version, classifier = found
    return classifier.suggest(mail_document(mail), version)
