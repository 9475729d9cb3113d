"""Preprocessing exactly as each model's authors run it, from the card alone.

Each model's path takes an RGB PIL image (already EXIF-transposed) and returns one float32
array in the layout the model consumes. Where Pillow alone does it, the path is two steps: the
geometry (``worker.decode.fit``: resize and crop to the input square, still 8-bit RGB), which
a decoder process can run and hand back, then ``normalize``. The parity tests compare these
arrays and the resulting scores against the reference libraries (timm transforms,
transformers image processors and Yahoo's Caffe pipeline).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from worker.decode.fit import CAFFE_RESIZE, FITTED_CROPS, Fit, needs_rows_first
from worker.models.card import ModelCard

__all__ = ["CAFFE_RESIZE", "draft_size", "fit_of", "normalize", "preprocess"]

CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def draft_size(card: ModelCard) -> int:
    """Smallest side a JPEG may be draft-decoded to: twice what the model resizes to first."""
    first_resize = CAFFE_RESIZE if card.crop == "caffe" else card.input_size
    return 2 * first_resize


def fit_of(card: ModelCard) -> Fit | None:
    """How the model fits a frame to its input, where Pillow alone does it (a decoder process
    can then return the input instead of the frame); None for torchvision's resize."""
    if card.crop not in FITTED_CROPS:
        return None
    return Fit(card.crop, card.input_size, card.interpolation)


def preprocess(card: ModelCard, image: Image.Image) -> np.ndarray:
    fit = fit_of(card)
    if fit is None:
        return _BY_CROP[card.crop](card, image)
    return normalize(card, fit(image))


def normalize(card: ModelCard, fitted: Image.Image) -> np.ndarray:
    """The model's input array from a frame already fitted (``Fit``): float32, its layout."""
    if card.crop == "caffe":
        # Caffe's layout: HWC, BGR, the mean pixel subtracted.
        pixels = np.asarray(fitted, dtype=np.float32)
        return np.ascontiguousarray(pixels[:, :, ::-1] - CAFFE_MEAN_BGR)
    pixels = np.asarray(fitted, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(card.mean, dtype=np.float32)
    std = np.asarray(card.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def _squash_tv(card: ModelCard, image: Image.Image) -> np.ndarray:
    # transformers 5's image processors: a uint8 CHW tensor resized by torchvision with
    # antialias (rounded back to uint8), then one fused rescale-and-normalize in float32.
    from worker.models._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from torchvision.transforms.v2 import functional as tvf

    size = card.input_size
    tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    mode = tvf.InterpolationMode(card.interpolation)
    if needs_rows_first(image.size, (size, size)):  # as in _squash_resize: torch, too,
        # resizes the width first, over every source row
        tensor = tvf.resize(tensor, [size, image.width], interpolation=mode, antialias=True)
    resized = tvf.resize(tensor, [size, size], interpolation=mode, antialias=True)
    scale = 1.0 / float(card.extra.get("rescale_factor", 1 / 255))
    mean = torch.tensor(card.mean) * scale
    std = torch.tensor(card.std) * scale
    normalized = tvf.normalize(resized.to(torch.float32), mean.tolist(), std.tolist())
    return np.ascontiguousarray(normalized.numpy())


_BY_CROP: dict[str, Callable[[ModelCard, Image.Image], np.ndarray]] = {
    "squash_tv": _squash_tv,
}
