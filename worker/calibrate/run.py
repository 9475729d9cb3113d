"""Calibrate a policy on a labelled set: read the labels, score, measure, choose thresholds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.calibrate.dataset import LabelledImage, label_names, read_labels
from worker.calibrate.metrics import (
    Choice,
    Sweep,
    Target,
    choose_thresholds,
    ranking_metrics,
    sweep,
)
from worker.calibrate.scoring import ScoredSet, score_images
from worker.calibrate.temperature import TemperatureFit, fit_temperature
from worker.config import Settings
from worker.errors import ConfigError, InvalidDataset

__all__ = ["Calibration", "Request", "analyse", "calibrate", "load_labels", "make_target"]


def make_target(precision: float | None, recall: float | None) -> Target:
    """The block target from the command line: a precision, a recall, or neither (max F1)."""
    if precision is not None and recall is not None:
        raise ConfigError("give --target-precision or --target-recall, not both")
    for name, value in (("--target-precision", precision), ("--target-recall", recall)):
        if value is not None and not 0.0 < value <= 1.0:
            raise ConfigError(f"{name} must be in (0, 1], got {value}")
    if precision is not None:
        return Target("precision", precision)
    if recall is not None:
        return Target("recall", recall)
    return Target("max_f1")


@dataclass(frozen=True)
class Request:
    labels_csv: Path
    target: Target
    review_recall: float = 0.95
    temperature: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.review_recall <= 1.0:
            raise ConfigError(f"--review-recall must be in (0, 1], got {self.review_recall}")


@dataclass(frozen=True)
class Calibration:
    request: Request
    scored: ScoredSet
    roc_auc: float
    average_precision: float
    sweep: Sweep
    choice: Choice
    temperature: TemperatureFit | None

    @property
    def scores(self) -> np.ndarray:
        return np.array([item.score for item in self.scored.scored], dtype=np.float64)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.image.label for item in self.scored.scored], dtype=np.int64)


def load_labels(settings: Settings, labels_csv: Path) -> list[LabelledImage]:
    """Read and check the labels before any weights load: the model's card (cheap, from its
    config files) says which of its own label names mean unsafe."""
    from worker.models.factory import build_card
    from worker.models.registry import resolve

    return read_labels(labels_csv, label_names(build_card(resolve(settings.model))))


def analyse(request: Request, scored: ScoredSet) -> Calibration:
    labels = np.array([item.image.label for item in scored.scored], dtype=np.int64)
    scores = np.array([item.score for item in scored.scored], dtype=np.float64)
    if len(set(labels.tolist())) < 2:
        raise InvalidDataset(
            f"{request.labels_csv}: after leaving out {len(scored.failed)} image(s) that could "
            "not be scored, fewer than two classes remain"
        )
    roc_auc, average_precision = ranking_metrics(scores, labels)
    choice = choose_thresholds(scores, labels, request.target, request.review_recall)
    fit = fit_temperature(scores, labels) if request.temperature else None
    return Calibration(
        request, scored, roc_auc, average_precision, sweep(scores, labels), choice, fit
    )


def calibrate(
    settings: Settings,
    request: Request,
    images: list[LabelledImage] | None = None,
    on_result: Callable[[], None] | None = None,
) -> Calibration:
    """The whole run, from the CSV (or ``images`` already read from it) to the chosen
    thresholds. Writes nothing: the runtime has no cache, no quarantine and no extras."""
    from worker.runtime import build_runtime
    from worker.storage import LocalStore

    if images is None:
        images = load_labels(settings, request.labels_csv)
    store = LocalStore({image.path.parent for image in images})
    # The policy decides nothing here: verdicts are recomputed from the chosen thresholds.
    settings = settings.model_copy(update={"policy": "default"})
    with build_runtime(settings, store=store, cache=None, quarantine=None, extras=False) as rt:
        return analyse(request, score_images(settings.batching, rt.pipeline, images, on_result))
