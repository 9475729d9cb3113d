"""From the model's input grid back to the original image, and the colours a reviewer sees.

Every preprocessing modq runs (``worker/models/preprocess.py``) is, per axis, a resize
followed by a crop: a point ``x`` of the original image lands at ``u = x * scale - offset``
in the model's input square. Inverting that map for every pixel of the original image (and
sampling the heatmap there, bilinearly, between cell centres) puts each cell of the model's
grid exactly over the part of the image it saw. Pixels the model never saw (cut off by a
centre crop) get no heat at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from worker.models.card import ModelCard
from worker.models.preprocess import CAFFE_RESIZE

__all__ = ["AxisMap", "blend", "colorize", "input_maps", "project"]


@dataclass(frozen=True)
class AxisMap:
    """``u = x * scale - offset``: original pixel coordinate to model input coordinate."""

    scale: float
    offset: float


def input_maps(card: ModelCard, size: tuple[int, int]) -> tuple[AxisMap, AxisMap]:
    """The per-axis maps of ``card``'s preprocessing for an image of ``size`` (w, h)."""
    width, height = size
    side = card.input_size
    if card.crop == "caffe":
        # 256x256 squash, then a centre crop of input_size (the JPEG round trip moves nothing).
        offset = (CAFFE_RESIZE - side) // 2
        return (
            AxisMap(CAFFE_RESIZE / width, offset),
            AxisMap(CAFFE_RESIZE / height, offset),
        )
    if card.crop == "center":
        # Mirrors worker.decode.fit._center: short side to input_size, long side truncated, then a
        # centre crop with a rounded offset.
        if width <= height:
            new = (side, int(side * height / width))
        else:
            new = (int(side * width / height), side)
        left = round((new[0] - side) / 2.0)
        top = round((new[1] - side) / 2.0)
        return AxisMap(new[0] / width, left), AxisMap(new[1] / height, top)
    # squash and squash_tv: the whole image stretched onto the input square.
    return AxisMap(side / width, 0.0), AxisMap(side / height, 0.0)


def _axis_weights(
    length: int, axis: AxisMap, side: int, cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel along one axis: the two grid cells around it, the weight of the
    second, and whether the model saw that pixel at all."""
    centres = (np.arange(length, dtype=np.float64) + 0.5) * axis.scale - axis.offset
    seen = (centres >= 0.0) & (centres < side)
    # Grid cell i covers input [i, i + 1) * side / cells; its centre is at i + 0.5.
    position = np.clip(centres * cells / side - 0.5, 0.0, cells - 1.0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    return low, high, position - low, seen


def project(card: ModelCard, grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``grid`` (rows x columns over the model's input square) as an (h, w) float32 map over
    the original image of ``size`` (w, h)."""
    width, height = size
    rows, columns = grid.shape
    map_x, map_y = input_maps(card, size)
    x0, x1, wx, seen_x = _axis_weights(width, map_x, card.input_size, columns)
    y0, y1, wy, seen_y = _axis_weights(height, map_y, card.input_size, rows)
    values = grid.astype(np.float64)
    along_x = values[:, x0] * (1.0 - wx) + values[:, x1] * wx
    heat = along_x[y0, :] * (1.0 - wy)[:, None] + along_x[y1, :] * wy[:, None]
    heat *= seen_y[:, None] & seen_x[None, :]
    return np.asarray(heat, dtype=np.float32)


# matplotlib's 'inferno', sampled at 33 evenly spaced points (perceptually uniform, readable
# in greyscale and by most colour-blind readers); interpolated linearly in between.
_INFERNO = np.array(
    [
        (0, 0, 4),
        (4, 3, 18),
        (11, 7, 36),
        (21, 11, 55),
        (33, 12, 74),
        (47, 10, 91),
        (61, 9, 101),
        (74, 12, 107),
        (87, 16, 110),
        (100, 21, 110),
        (113, 25, 110),
        (125, 30, 109),
        (138, 34, 106),
        (151, 39, 102),
        (163, 44, 97),
        (176, 49, 91),
        (188, 55, 84),
        (199, 62, 76),
        (210, 70, 68),
        (219, 80, 59),
        (228, 90, 49),
        (235, 102, 40),
        (241, 115, 29),
        (246, 128, 19),
        (249, 142, 9),
        (251, 157, 7),
        (252, 172, 17),
        (251, 188, 33),
        (249, 203, 53),
        (245, 219, 76),
        (242, 234, 105),
        (243, 246, 138),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] to (h, w, 3) uint8 colours (built in: no plotting library)."""
    position = np.clip(heat.astype(np.float64), 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(_INFERNO) - 1)
    weight = (position - low)[..., None]
    colours = _INFERNO[low] * (1.0 - weight) + _INFERNO[high] * weight
    return np.asarray(np.round(colours), dtype=np.uint8)


def blend(image: Image.Image, heat: np.ndarray, alpha: float) -> Image.Image:
    """``image`` with the colour-mapped ``heat`` laid over it at opacity ``alpha``."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    mixed = (1.0 - alpha) * base + alpha * colorize(heat).astype(np.float64)
    return Image.fromarray(np.round(mixed).astype(np.uint8))
