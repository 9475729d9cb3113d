"""Preprocessing exactly as each model's authors run it, from the card alone.

Each function takes an RGB PIL image (already EXIF-transposed) and returns one float32 array
in the layout the model consumes. The parity tests compare these arrays and the resulting
scores against the reference libraries (timm transforms, transformers image processors and
Yahoo's Caffe pipeline).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from worker.models.card import ModelCard

__all__ = ["draft_size", "preprocess"]

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

CAFFE_RESIZE = 256
CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
#: the largest intermediate image a resize may build in one pass (see _center and
#: _squash_resize); ordinary images stay far below it and take the authors' exact path
MAX_INTERMEDIATE_PIXELS = 16_000_000


def draft_size(card: ModelCard) -> int:
    """Smallest side a JPEG may be draft-decoded to: twice what the model resizes to first."""
    first_resize = CAFFE_RESIZE if card.crop == "caffe" else card.input_size
    return 2 * first_resize


def preprocess(card: ModelCard, image: Image.Image) -> np.ndarray:
    return _BY_CROP[card.crop](card, image)


def _caffe(card: ModelCard, image: Image.Image) -> np.ndarray:
    # Yahoo's classify_nsfw.py: resize to 256x256, JPEG-encode, decode, then crop 224. The
    # network was fitted to JPEG artefacts, so the round trip is part of the model.
    resized = _squash_resize(image, (CAFFE_RESIZE, CAFFE_RESIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as reloaded:
        pixels = np.asarray(reloaded.convert("RGB"), dtype=np.float32)
    offset = (CAFFE_RESIZE - card.input_size) // 2
    crop = pixels[offset : offset + card.input_size, offset : offset + card.input_size, :]
    return np.ascontiguousarray(crop[:, :, ::-1] - CAFFE_MEAN_BGR)


def _center(card: ModelCard, image: Image.Image) -> np.ndarray:
    # torchvision Resize(int) on a PIL image: short side to size, long side truncated.
    size = card.input_size
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    # torchvision CenterCrop rounds the offset.
    left = round((new[0] - size) / 2.0)
    top = round((new[1] - size) / 2.0)
    resample = _PIL_INTERPOLATION[card.interpolation]
    if new[0] * new[1] <= MAX_INTERMEDIATE_PIXELS:
        resized = image.resize(new, resample=resample)
        return _normalize(card, resized.crop((left, top, left + size, top + size)))
    # Past that (a 1x100000 strip would become 384 x 38 million pixels) resize only the
    # crop, as a box in source coordinates at the full resize's scale: each output pixel's
    # filter depends on the scale and its centre alone, so the pixels are those of the full
    # resize but for rounding (a level or two where a fixed-point weight rounds the other
    # way); below it, the models' authors' path to the bit.
    scale_x, scale_y = width / new[0], height / new[1]
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    return _normalize(card, image.resize((size, size), resample=resample, box=box))


def _squash(card: ModelCard, image: Image.Image) -> np.ndarray:
    size = card.input_size
    resized = _squash_resize(image, (size, size), _PIL_INTERPOLATION[card.interpolation])
    return _normalize(card, resized)


def _squash_resize(
    image: Image.Image, size: tuple[int, int], resample: Image.Resampling
) -> Image.Image:
    """``image.resize(size)``, in two steps where one would build a huge intermediate.

    Pillow resizes rows first, into the new width times every source row: a 1x50,000,000
    strip squashed to 384x384 would take 19 G pixels. Where that intermediate passes both
    the source's size and MAX_INTERMEDIATE_PIXELS, the rows are reduced first (rounding once
    more in between); every other image takes the one-pass path the models' authors ran."""
    if _needs_rows_first(image.size, size):
        image = image.resize((image.width, size[1]), resample=resample)
    return image.resize(size, resample=resample)


def _needs_rows_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    width, height = source
    intermediate = size[0] * height
    return intermediate > max(MAX_INTERMEDIATE_PIXELS, width * height) and height > size[1]


def _normalize(card: ModelCard, image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
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
    if _needs_rows_first(image.size, (size, size)):  # as in _squash_resize: torch, too,
        # resizes the width first, over every source row
        tensor = tvf.resize(tensor, [size, image.width], interpolation=mode, antialias=True)
    resized = tvf.resize(tensor, [size, size], interpolation=mode, antialias=True)
    scale = 1.0 / float(card.extra.get("rescale_factor", 1 / 255))
    mean = torch.tensor(card.mean) * scale
    std = torch.tensor(card.std) * scale
    normalized = tvf.normalize(resized.to(torch.float32), mean.tolist(), std.tolist())
    return np.ascontiguousarray(normalized.numpy())


_BY_CROP: dict[str, Callable[[ModelCard, Image.Image], np.ndarray]] = {
    "caffe": _caffe,
    "center": _center,
    "squash": _squash,
    "squash_tv": _squash_tv,
}
