"""The classifier: TF-IDF over character n-grams (no Japanese word splitter needed; robust to
typos and mixed widths) and one logistic regression per target (category, assignee).

Its reason for a prediction is the three n-grams of the mail that added most to the predicted
class's score (tf-idf value times the class's weight), which a person can check against the text.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from ingest.mail import Suggestion
from triage.features import normalise

REASONS = 3


class TrainingError(ValueError):
    """Too little to learn from (no tickets, or a single category)."""


@dataclass(frozen=True)
class Guess:
    label: str
    probability: float
    reason: tuple[str, ...]


class Head:
    """One target: a logistic regression, or the one label when the tickets show only one."""

    def __init__(self, x: sp.csr_matrix, labels: Sequence[str]) -> None:
        self.classes = sorted(set(labels))
        self.model: LogisticRegression | None = None
        if len(self.classes) > 1:
            self.model = LogisticRegression(C=20.0, max_iter=300)
            self.model.fit(x, labels)
            self.classes = [str(c) for c in self.model.classes_]

    def probabilities(self, x: sp.csr_matrix) -> np.ndarray:
        if self.model is None:
            return np.ones((x.shape[0], 1))
        return np.asarray(self.model.predict_proba(x))

    def weights(self, index: int) -> np.ndarray | None:
        """The weight of every feature for class `index` (binary models keep one row)."""
        if self.model is None:
            return None
        coef = self.model.coef_
        if coef.shape[0] == 1:
            return np.asarray(coef[0] if index == 1 else -coef[0])
        return np.asarray(coef[index])


class Classifier:
    """Fitted on documents (triage.features.document) and their labels."""

    def __init__(self) -> None:
        self.vectorizer = TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=(2, 4),
            preprocessor=normalise,
            sublinear_tf=True,
            min_df=2,
            max_features=150_000,
            dtype=np.float32,
        )
        self.category: Head | None = None
        self.assignee: Head | None = None
        self.features: np.ndarray = np.array([])
        self.library = f"scikit-learn {sklearn.__version__}"

    def fit(
        self, documents: Sequence[str], categories: Sequence[str], assignees: Sequence[str | None]
    ) -> Classifier:
        if len(set(categories)) < 2:
            raise TrainingError(
                f"need tickets of at least two categories, have {len(documents)} ticket(s) "
                f"of {len(set(categories))}"
            )
        x = self.vectorizer.fit_transform(documents)
        self.features = self.vectorizer.get_feature_names_out()
        self.category = Head(x, categories)
        with_assignee = [i for i, a in enumerate(assignees) if a]
        if with_assignee:
            self.assignee = Head(x[with_assignee], [str(assignees[i]) for i in with_assignee])
        return self

    def predict(self, documents: Sequence[str]) -> list[tuple[Guess, Guess | None]]:
        """(category, assignee) for each document, with probability and reason."""
        assert self.category is not None, "fit first"
        x = sp.csr_matrix(self.vectorizer.transform(documents))
        categories = self._guesses(self.category, x)
        assignees = self._guesses(self.assignee, x) if self.assignee else [None] * len(categories)
        return list(zip(categories, assignees, strict=True))

    def suggest(self, document: str, version: int) -> Suggestion:
        category, assignee = self.predict([document])[0]
        return Suggestion(
            category=category.label,
            category_probability=category.probability,
            assignee=assignee.label if assignee else None,
            assignee_probability=assignee.probability if assignee else 0.0,
            model_version=version,
            reason=category.reason,
        )

    def _guesses(self, head: Head, x: sp.csr_matrix) -> list[Guess]:
        probabilities = head.probabilities(x)
        guesses = []
        for row, p in enumerate(probabilities):
            best = int(np.argmax(p))
            reason = self._reason(head.weights(best), x.getrow(row))
            guesses.append(Guess(head.classes[best], round(float(p[best]), 4), reason))
        return guesses

    def _reason(self, weights: np.ndarray | None, row: sp.csr_matrix) -> tuple[str, ...]:
        if weights is None or row.nnz == 0:
            return ()
        scores = row.data * weights[row.indices]
        top = np.argsort(-scores)[:REASONS]
        return tuple(str(self.features[row.indices[i]]) for i in top if scores[i] > 0)


def dump(classifier: Classifier) -> tuple[bytes, str]:
    """The model's bytes and their sha256."""
    data = pickle.dumps(classifier, protocol=pickle.HIGHEST_PROTOCOL)
    return data, hashlib.sha256(data).hexdigest()


def load(data: bytes, sha256: str) -> Classifier:
    """Unpickle a model the store trained, after checking its bytes against the sha256 stored
    with them; pickles run code, so nothing else is ever loaded (docs/triage.md)."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("stored triage model does not match its sha256; train it again")
    classifier = pickle.loads(data)  # our own model: its bytes were checked above
    if not isinstance(classifier, Classifier):
        raise ValueError("stored triage model is not a triage Classifier")
    return classifier
