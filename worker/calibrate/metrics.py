"""Ranking metrics and threshold choice on raw ``nsfw_score`` values.

An image is flagged at threshold ``t`` when ``score >= t``: the very comparison
``Policy.decide`` makes, so every count here is what the worker will do with the same
thresholds. Candidate thresholds are the set's own distinct scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.errors import MissingExtra

__all__ = [
    "MARGIN",
    "Choice",
    "Confusion",
    "Operating",
    "Sweep",
    "Target",
    "choose_thresholds",
    "confusion_at",
    "ranking_metrics",
    "sweep",
]

# A chosen threshold sits this far below the score it was chosen at (or halfway to the next
# lower score, if that is closer): the set's verdicts are unchanged, and a score that moves in
# its last bits with the batch it was run in does not flip at the boundary.
MARGIN = 1e-6


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        flagged = self.tp + self.fp
        return self.tp / flagged if flagged else 1.0  # nothing flagged: no false alarm

    @property
    def recall(self) -> float:
        positives = self.tp + self.fn
        return self.tp / positives if positives else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_positive_rate(self) -> float:
        negatives = self.fp + self.tn
        return self.fp / negatives if negatives else 0.0


@dataclass(frozen=True)
class Operating:
    """A threshold and what it does on the labelled set."""

    threshold: float
    confusion: Confusion


@dataclass(frozen=True)
class Target:
    kind: Literal["precision", "recall", "max_f1"]
    value: float | None = None

    def describe(self) -> str:
        return "max F1" if self.value is None else f"{self.kind} >= {self.value:g}"


@dataclass(frozen=True)
class Choice:
    block: Operating
    review: Operating
    target: Target
    review_recall: float
    #: False when no threshold reaches the target; ``block`` is then the closest one
    met: bool


@dataclass(frozen=True)
class Sweep:
    """Counts at every distinct score, highest first."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    def confusion(self, index: int) -> Confusion:
        tp, fp = int(self.tp[index]), int(self.fp[index])
        return Confusion(tp, fp, self.positives - tp, self.negatives - fp)

    @property
    def precision(self) -> np.ndarray:
        return np.asarray(self.tp / (self.tp + self.fp), dtype=np.float64)

    @property
    def recall(self) -> np.ndarray:
        return np.asarray(self.tp / self.positives, dtype=np.float64)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)

    @property
    def false_positive_rate(self) -> np.ndarray:
        return np.asarray(self.fp / max(self.negatives, 1), dtype=np.float64)


def sweep(scores: np.ndarray, labels: np.ndarray) -> Sweep:
    thresholds = np.unique(scores)[::-1]
    order = np.sort(scores[labels == 1])
    negatives = np.sort(scores[labels == 0])
    # Images with score >= t: everything right of the first index whose value is >= t.
    tp = len(order) - np.searchsorted(order, thresholds, side="left")
    fp = len(negatives) - np.searchsorted(negatives, thresholds, side="left")
    return Sweep(thresholds, tp, fp, len(order), len(negatives))


def confusion_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Confusion:
    flagged = scores >= threshold
    positive = labels == 1
    return Confusion(
        int(np.sum(flagged & positive)),
        int(np.sum(flagged & ~positive)),
        int(np.sum(~flagged & positive)),
        int(np.sum(~flagged & ~positive)),
    )


def ranking_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and average precision (the step-wise area under the PR curve)."""
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError as exc:
        raise MissingExtra("calibration needs scikit-learn: pip install 'modq[analysis]'") from exc
    return float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))


def choose_thresholds(
    scores: np.ndarray, labels: np.ndarray, target: Target, review_recall: float
) -> Choice:
    """``block_at`` by the target, ``review_at`` at the highest threshold keeping recall at
    ``review_recall``, never above ``block_at``."""
    table = sweep(scores, labels)
    block, met = _block_index(table, target)
    recall = table.recall
    # Recall only grows as the threshold falls, and the lowest score flags everything.
    review = int(np.argmax(recall >= review_recall - 1e-12))
    review = max(review, block)
    return Choice(
        _operating(table, scores, labels, block),
        _operating(table, scores, labels, review),
        target,
        review_recall,
        met,
    )


def _block_index(table: Sweep, target: Target) -> tuple[int, bool]:
    if target.kind == "precision":
        assert target.value is not None
        reaching = np.flatnonzero(table.precision >= target.value - 1e-12)
        if len(reaching):
            return int(reaching[-1]), True  # the lowest such threshold: most recall
        best = table.precision.max()
        return int(np.flatnonzero(table.precision == best)[-1]), False
    if target.kind == "recall":
        assert target.value is not None
        reaching = np.flatnonzero(table.recall >= target.value - 1e-12)
        return int(reaching[0]), True  # the lowest score flags all: always reachable
    # Ties go to the highest threshold: the same F1 with fewer images flagged.
    return int(np.argmax(table.f1)), True


def _operating(table: Sweep, scores: np.ndarray, labels: np.ndarray, index: int) -> Operating:
    score = float(table.thresholds[index])
    lower = float(table.thresholds[index + 1]) if index + 1 < len(table.thresholds) else 0.0
    threshold = max(0.0, score - min(MARGIN, (score - lower) / 2))
    # Counted again at the placed threshold, the way Policy.decide will count.
    return Operating(threshold, confusion_at(scores, labels, threshold))
