"""The classifier: TF-IDF over character 2- and 3-grams within words (no Japanese word splitter
needed; robust to typos and mixed widths) and one logistic regression per target (category,
assignee), fitted by stochastic gradient descent: seconds for thousands of tickets, where the
exact solver took tens of seconds for the same accuracy (docs/triage.md).

Its reason for a prediction is the three n-grams of the mail that added most to the predicted
class's score (tf-idf value times the class's weight), which a person can check against the text.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import SGDClassifier

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
    """One target: a logistic regression, or the one label when the tickets show only one.
    A fixed number of passes (no tolerance) and a fixed seed: the same tickets give the same
    model."""

    def __init__(self, x: sp.csr_matrix, labels: Sequence[str]) -> None:
        self.classes = sorted(set(labels))
        self.model: SGDClassifier | None = None
        if len(self.classes) > 1:
            self.model = SGDClassifier(
                loss="log_loss", alpha=1e-5, max_iter=30, tol=None, random_state=0
            )
            self.model.fit(x, labels)
            self.classes = [str(c) for c in self.model.classes_]

    def probabilities(self, x: sp.csr_matrix) -> np.ndarray:
        """As `predict_proba` computes them (one-vs-rest logistic, normalised), without its
        input checks, which cost more than the arithmetic for one mail."""
        if self.model is None:
            return np.ones((x.shape[0], 1))
        scores = np.asarray(x @ self.model.coef_.T) + self.model.intercept_
        p = 1.0 / (1.0 + np.exp(-scores))
        if p.shape[1] == 1:
            return np.hstack([1.0 - p, p])
        return np.asarray(p / p.sum(axis=1, keepdims=True))

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
            ngram_range=(2, 3),
            preprocessor=normalise,
            sublinear_tf=True,
            min_df=2,
            max_features=100_000,
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
        x = self.vectors(documents)
        categories = self._guesses(self.category, x)
        assignees = self._guesses(self.assignee, x) if self.assignee else [None] * len(categories)
        return list(zip(categories, assignees, strict=True))

    def vectors(self, documents: Sequence[str]) -> sp.csr_matrix:
        """What `vectorizer.transform` returns (sublinear tf times idf, rows of unit length),
        computed directly: sklearn's input checks took most of the time for one mail."""
        analyze = self.vectorizer.build_analyzer()
        vocabulary, idf = self.vectorizer.vocabulary_, self.vectorizer.idf_
        data: list[float] = []
        indices: list[int] = []
        indptr = [0]
        for doc in documents:
            counts = Counter(vocabulary.get(g, -1) for g in analyze(doc))
            counts.pop(-1, None)
            columns = np.fromiter(sorted(counts), dtype=np.int64, count=len(counts))
            tf = np.fromiter((counts[c] for c in columns), dtype=np.float64, count=len(counts))
            values = (1.0 + np.log(tf)) * idf[columns]
            norm = float(np.sqrt((values**2).sum())) or 1.0
            indices.extend(columns.tolist())
            data.extend((values / norm).tolist())
            indptr.append(len(indices))
        shape = (len(documents), len(idf))
        return sp.csr_matrix((np.array(data, dtype=np.float32), indices, indptr), shape=shape)

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
            span = slice(x.indptr[row], x.indptr[row + 1])
            reason = self._reason(head.weights(best), x.indices[span], x.data[span])
            guesses.append(Guess(head.classes[best], round(float(p[best]), 4), reason))
        return guesses

    def _reason(
        self, weights: np.ndarray | None, columns: np.ndarray, values: np.ndarray
    ) -> tuple[str, ...]:
        """The (up to three) n-grams of the mail, with a letter in them, that added most to the
        predicted class's score."""
        if weights is None or not len(columns):
            return ()
        scores = values * weights[columns]
        reasons: list[str] = []
        for i in np.argsort(-scores):
            gram = str(self.features[columns[i]]).strip()
            if scores[i] <= 0 or len(reasons) == REASONS:
                break
            if any(ch.isalpha() for ch in gram) and gram not in reasons:  # words, not `: 0`
                reasons.append(gram)
        return tuple(reasons)


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
