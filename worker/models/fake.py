"""A small deterministic model that needs neither ONNX Runtime nor torch, nor any file.

``FakeBackend`` ships beside the real backends so tests of the pipeline, the service and the
batcher (and anyone trying modq without a model) run on the same ``Backend`` seam in
milliseconds. It preprocesses as a real squash model does (``worker.models.preprocess``:
resize to 32x32, normalise), and its nsfw score is a pure function of the image's colour::

    nsfw = sigmoid(GAIN * (mean red - (mean green + mean blue) / 2))    pixels in [0, 1]

so a test picks a score by picking a colour:

* pure red ``(255, 0, 0)`` scores 0.9997 (a block under the default policy, 0.5 / 0.85);
* any grey, black or white scores exactly 0.5 (review under the default policy);
* pure green ``(0, 255, 0)`` or blue scores 0.018, cyan ``(0, 255, 255)`` 0.0003 (allow);
* ``colour_for(score)`` is the flat colour that scores ``score`` (to within 0.01, for scores
  in [0.003, 0.997]), and ``image_with_score(score)`` an image of it.

With ``embed=True`` it also returns a 4-dimensional embedding: the mean red, green and blue
and the standard deviation of all pixels, in [0, 1]. ``forward_calls`` and ``batch_sizes``
count what it ran, for tests about batching and cache hits.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
from PIL import Image

from worker.models.backend import Backend, BatchOutput
from worker.models.card import ModelCard

__all__ = ["FAKE_CARD", "GAIN", "FakeBackend", "colour_for", "image_with_score"]

#: how steeply the score follows the colour balance (see the module docstring)
GAIN = 8.0
#: the largest colour shift ``colour_for`` makes around mid-grey without clipping a channel
_MAX_SHIFT = 127.0

FAKE_CARD = ModelCard(
    id="modq/fake",
    revision="1",
    # No runtime is loaded; "onnx" is the card's closest kind (a graph with its own
    # preprocessing, no torch), and ``describe()`` says "fake".
    runtime="onnx",
    labels=("sfw", "nsfw"),
    input_size=32,
    crop="squash",
    interpolation="bilinear",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    embedding_dim=4,
    license="MIT",
    architecture="fake",
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def colour_for(score: float) -> tuple[int, int, int]:
    """The flat RGB colour FakeBackend scores ``score`` (red up and green and blue down
    from mid-grey for scores above 0.5, the other way below)."""
    if not 0.0 < score < 1.0:
        raise ValueError(f"a score strictly between 0 and 1, not {score}")
    balance = math.log(score / (1.0 - score)) / GAIN  # mean red - mean(green, blue)
    shift = max(-_MAX_SHIFT, min(_MAX_SHIFT, balance * 255.0 / 1.5))
    red, other = 128 + shift, 128 - shift / 2
    return (round(red), round(other), round(other))


def image_with_score(score: float, size: int = 64) -> Image.Image:
    """A ``size`` x ``size`` RGB image FakeBackend scores ``score`` (see ``colour_for``)."""
    return Image.new("RGB", (size, size), colour_for(score))


class FakeBackend(Backend):
    """A deterministic ``Backend`` that scores an image by its colour balance.

    ``delay_s`` makes every forward pass take at least that long (a slow model, for
    batching and deadline tests). Counters are safe to read from any thread."""

    card = FAKE_CARD
    precision = "fp32"
    device = "cpu"

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._batch_sizes: list[int] = []

    # --- what it ran --------------------------------------------------------------------

    @property
    def batch_sizes(self) -> list[int]:
        """The size of every batch ``forward`` ran, in order."""
        with self._lock:
            return list(self._batch_sizes)

    @property
    def forward_calls(self) -> int:
        with self._lock:
            return len(self._batch_sizes)

    @property
    def images_scored(self) -> int:
        with self._lock:
            return sum(self._batch_sizes)

    def reset_counters(self) -> None:
        with self._lock:
            self._batch_sizes.clear()

    # --- the Backend seam ----------------------------------------------------------------

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        size = self.card.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise ValueError(f"{self.card.id}: expected (N, 3, {size}, {size}), got {batch.shape}")
        with self._lock:
            self._batch_sizes.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        mean = np.asarray(self.card.mean, dtype=np.float64).reshape(1, 3, 1, 1)
        std = np.asarray(self.card.std, dtype=np.float64).reshape(1, 3, 1, 1)
        pixels = np.clip(batch.astype(np.float64) * std + mean, 0.0, 1.0)  # back to [0, 1]
        channels = pixels.mean(axis=(2, 3))  # (N, RGB)
        balance = channels[:, 0] - (channels[:, 1] + channels[:, 2]) / 2.0
        nsfw = _sigmoid(GAIN * balance)
        probabilities = np.stack([1.0 - nsfw, nsfw], axis=1).astype(np.float32)
        embeddings = None
        if embed:
            spread = pixels.reshape(len(batch), -1).std(axis=1, keepdims=True)
            embeddings = np.concatenate([channels, spread], axis=1).astype(np.float32)
        return BatchOutput(probabilities, embeddings)

    def describe(self) -> str:
        return f"{self.card.id} (fake, {self.precision}, {self.device})"
