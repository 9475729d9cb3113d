"""The seam every model runtime implements, in the order data meets it.

``preprocess`` runs per image in the caller's thread (decode threads overlap it with
inference); ``forward`` runs one batch; ``postprocess`` turns one row of probabilities into
``Scores``. Backends hold one loaded model and are shared by the batcher thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image

from worker.decode.fit import Fit
from worker.models.card import ModelCard
from worker.models.preprocess import fit_of, normalize, preprocess

__all__ = ["Backend", "BatchOutput", "ModelOutput", "Scores", "scores_from_probabilities"]


@dataclass(frozen=True)
class Scores:
    """Per-label probabilities and what modq derives from them."""

    probabilities: dict[str, float]
    nsfw_score: float
    # Graded models only: the worst level whose cumulative score is at least 0.5, and the
    # cumulative scores (P(level or worse)) of each level above the safest.
    level: str | None = None
    level_scores: dict[str, float] | None = None


@dataclass(frozen=True)
class ModelOutput:
    scores: Scores
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class BatchOutput:
    probabilities: np.ndarray  # (N, labels) float32
    embeddings: np.ndarray | None  # (N, dim) float32


def scores_from_probabilities(card: ModelCard, row: np.ndarray) -> Scores:
    probabilities = {label: float(p) for label, p in zip(card.labels, row, strict=True)}
    if not card.graded:
        nsfw = sum(probabilities[label] for label in card.unsafe_labels)
        return Scores(probabilities, min(1.0, nsfw))
    # Freepik's own package: high = p3, medium = p2 + p3, low = p1 + p2 + p3; NSFW when
    # medium >= 0.5. nsfw_score follows that rule.
    cumulative: dict[str, float] = {}
    running = 0.0
    for label in reversed(card.labels[1:]):
        running += probabilities[label]
        cumulative[label] = min(1.0, running)
    cumulative = {label: cumulative[label] for label in card.labels[1:]}
    level = card.labels[0]
    for label in card.labels[1:]:
        if cumulative[label] >= 0.5:
            level = label
    nsfw_label = card.labels[2] if len(card.labels) > 2 else card.labels[-1]
    return Scores(probabilities, cumulative[nsfw_label], level, cumulative)


class Backend(ABC):
    card: ModelCard
    precision: str = "fp32"
    device: str = "cpu"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        fit = fit_of(self.card)
        if fit is None:
            return preprocess(self.card, image)
        return self.normalize(fit(image))  # the pipeline's path, whatever normalize does

    @property
    def fit(self) -> Fit | None:
        """The geometric half of ``preprocess`` where Pillow does it (a decoder process runs
        it); ``normalize`` is the rest: ``preprocess(x) == normalize(fit(x))``. None where
        the card's fitting is torchvision's, or where a backend preprocesses its own way:
        those receive frames."""
        if type(self).preprocess is not Backend.preprocess:
            return None
        return fit_of(self.card)

    def normalize(self, fitted: Image.Image) -> np.ndarray:
        return normalize(self.card, fitted)

    @abstractmethod
    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        """Run one batch of preprocessed arrays (stacked on axis 0)."""

    def postprocess(self, output: BatchOutput, index: int) -> ModelOutput:
        embedding = None if output.embeddings is None else output.embeddings[index]
        return ModelOutput(
            scores_from_probabilities(self.card, output.probabilities[index]), embedding
        )

    def predict(self, images: list[Image.Image], embed: bool = False) -> list[ModelOutput]:
        """The batch API: preprocess, one forward pass, postprocess."""
        if not images:
            return []
        output = self.forward(np.stack([self.preprocess(image) for image in images]), embed)
        return [self.postprocess(output, i) for i in range(len(images))]

    def describe(self) -> str:
        return f"{self.card.id} ({self.card.runtime}, {self.precision}, {self.device})"
