"""The explainer seam: one image in, a heatmap over what the model saw out.

Each method (attention rollout, Grad-CAM) only turns one preprocessed array into a grid of
non-negative relevance over the model's input square; preprocessing (the backend's own, so
the map is of exactly what the model saw), normalisation and mapping back onto the original
image are shared here.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image

from worker.errors import ConfigError
from worker.explain.geometry import blend, project
from worker.models.backend import Backend
from worker.models.card import ModelCard

__all__ = ["Explainer", "Heatmap", "score_labels"]


@dataclass(frozen=True)
class Heatmap:
    """Relevance over the model's input grid (rows x columns covering the input square).

    ``values``: float32 in [0, 1], 1 at the most relevant cell. ``method``:
    ``attention_rollout`` or ``grad_cam``. ``target``: what the map explains (Grad-CAM: the
    log-odds of the unsafe score; rollout is class-agnostic and says which token it follows).
    """

    values: np.ndarray
    method: str
    target: str


def score_labels(card: ModelCard) -> tuple[str, ...]:
    """The labels whose probability makes up ``nsfw_score`` (Freepik's graded levels:
    medium and worse, as ``scores_from_probabilities`` counts them)."""
    if card.graded and not card.declared_unsafe:
        return card.labels[2:] if len(card.labels) > 2 else card.labels[-1:]
    return card.unsafe_labels


def normalise(grid: np.ndarray, floor: bool) -> np.ndarray:
    """Scale to [0, 1]: ``floor`` also moves the minimum to 0 (rollout, whose every cell is
    positive, only means anything relative to the others); Grad-CAM keeps 0 as "no
    evidence for the target" and divides by the maximum."""
    values = np.nan_to_num(grid.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if floor:
        values = values - values.min()
    top = values.max()
    if top <= 0.0:
        return np.zeros(grid.shape, dtype=np.float32)
    return np.asarray(np.clip(values / top, 0.0, 1.0), dtype=np.float32)


class Explainer(ABC):
    """Explains one backend's scores. Thread-safe: the torch methods run on their own copy
    of the model behind ``_lock``; the ONNX method shares nothing mutable."""

    method: str = ""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.card = backend.card
        self._lock = threading.Lock()

    @abstractmethod
    def _relevance(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        """Raw relevance grid over the input square for one preprocessed array, and the
        target it explains."""

    def _normalise(self, grid: np.ndarray) -> np.ndarray:
        return normalise(grid, floor=False)

    def explain(self, image: Image.Image) -> Heatmap:
        """The heatmap of ``image`` (RGB, EXIF-transposed, as the decoder returns it)."""
        pixels = self.backend.preprocess(image)
        grid, target = self._relevance(pixels)
        return Heatmap(self._normalise(grid), self.method, target)

    def project(self, heatmap: Heatmap, size: tuple[int, int]) -> np.ndarray:
        """``heatmap`` over an original image of ``size`` (w, h), undoing the resize and
        crop of this model's preprocessing; (h, w) float32, 0 where the model saw nothing."""
        return project(self.card, heatmap.values, size)

    def overlay(self, image: Image.Image, heatmap: Heatmap, alpha: float = 0.45) -> Image.Image:
        """``image`` at its own size with the colour-mapped heatmap blended over it."""
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be between 0 and 1, not {alpha}")
        return blend(image, self.project(heatmap, image.size), alpha)
