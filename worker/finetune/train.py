"""The epoch loop both modes share: measure, train, measure, stop early, keep the best.

Epoch 0 is the untrained model measured on the validation set, so every run reports honestly
how far training moved it from where it started. New heads start at zero, so epoch 0 is
chance: uniform probabilities, a loss of ln(labels), every image given the first label.
Early stopping watches the validation loss and restores the weights of the epoch where it
was lowest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from worker.errors import ConfigError

__all__ = [
    "EpochMetrics",
    "History",
    "OnEpoch",
    "TrainOptions",
    "Trainable",
    "class_weights",
    "confusion_matrix",
    "fit",
]


@dataclass(frozen=True)
class TrainOptions:
    epochs: int
    lr: float
    batch_size: int
    patience: int = 3
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float | None  # None for epoch 0: nothing was trained yet
    val_loss: float
    val_accuracy: float
    f1: dict[str, float]  # per label, on the validation set
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


OnEpoch = Callable[[EpochMetrics], None]
# For early stopping a validation loss must drop by more than this to count as progress: a
# loss creeping down in the sixth decimal would otherwise keep a converged run going to its
# last epoch. The epoch kept is still the one with the lowest loss.
MIN_DELTA = 1e-4


class Trainable(Protocol):
    """What the loop needs from a mode: one pass of training, an evaluation, and a way to
    keep and bring back the best weights."""

    def train_epoch(self) -> float:
        """Train one epoch; the mean training loss."""

    def evaluate(self) -> tuple[float, np.ndarray]:
        """Validation loss and the predicted label index of each validation item."""

    def snapshot(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@dataclass(frozen=True)
class History:
    epochs: list[EpochMetrics]
    best_epoch: int
    confusion: np.ndarray  # validation, best epoch: rows true label, columns predicted
    stopped_early: bool
    seconds: float

    @property
    def best(self) -> EpochMetrics:
        return self.epochs[self.best_epoch]


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over the samples), so a rare label counts as much
    as a common one in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return np.asarray(len(labels) / (num_classes * np.maximum(counts, 1.0)), dtype=np.float32)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def _f1(matrix: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    scores = {}
    for i, name in enumerate(names):
        tp = matrix[i, i]
        wrong = matrix[i, :].sum() - tp + matrix[:, i].sum() - tp
        scores[name] = float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0
    return scores


def _measure(
    epoch: int,
    train_loss: float | None,
    trainable: Trainable,
    truth: np.ndarray,
    names: tuple[str, ...],
    started: float,
) -> tuple[EpochMetrics, np.ndarray]:
    val_loss, predicted = trainable.evaluate()
    matrix = confusion_matrix(truth, predicted, len(names))
    accuracy = float(np.trace(matrix) / max(1, matrix.sum()))
    seconds = time.perf_counter() - started
    return EpochMetrics(epoch, train_loss, val_loss, accuracy, _f1(matrix, names), seconds), matrix


def fit(
    trainable: Trainable,
    val_labels: np.ndarray,
    names: tuple[str, ...],
    options: TrainOptions,
    on_epoch: OnEpoch | None = None,
) -> History:
    """Run up to ``options.epochs`` epochs; stop once ``patience`` epochs in a row bring no
    drop in validation loss larger than ``MIN_DELTA``, and restore the trained epoch with the
    lowest validation loss (never the untrained epoch 0)."""
    started = time.perf_counter()
    metrics, matrix = _measure(0, None, trainable, val_labels, names, started)
    epochs = [metrics]
    if on_epoch is not None:
        on_epoch(metrics)
    best_epoch, best_loss, best_state, best_matrix = 0, float("inf"), None, matrix
    anchor_epoch, anchor_loss = 0, float("inf")  # the last epoch that improved by > MIN_DELTA
    for epoch in range(1, options.epochs + 1):
        epoch_started = time.perf_counter()
        train_loss = trainable.train_epoch()
        metrics, matrix = _measure(epoch, train_loss, trainable, val_labels, names, epoch_started)
        epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        if metrics.val_loss < best_loss:
            best_epoch, best_loss, best_matrix = epoch, metrics.val_loss, matrix
            best_state = trainable.snapshot()
        if metrics.val_loss < anchor_loss - MIN_DELTA:
            anchor_epoch, anchor_loss = epoch, metrics.val_loss
        elif epoch - anchor_epoch >= options.patience:
            break
    if best_state is None:
        raise ConfigError(
            f"training diverged (validation loss {epochs[-1].val_loss}); try a lower --lr"
        )
    trainable.restore(best_state)
    stopped_early = len(epochs) - 1 < options.epochs
    return History(epochs, best_epoch, best_matrix, stopped_early, time.perf_counter() - started)
