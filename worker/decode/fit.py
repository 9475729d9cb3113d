"""The geometry of a model's input: a decoded frame resized and cropped to the square the model
reads, still as 8-bit RGB, exactly as each model's authors do it before normalising.

It lives beside the decoder so that a decoder process can hand back the model's input (a few
hundred KB) instead of the frame (megabytes); ``worker.models.preprocess`` normalises what it
returns. Only the Pillow pipelines are here: transformers' processors resize with torchvision
(``squash_tv``), which the decoder processes do not load, so those models receive frames.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

__all__ = ["CAFFE_RESIZE", "FITTED_CROPS", "MAX_INTERMEDIATE_PIXELS", "Fit", "needs_rows_first"]

CAFFE_RESIZE = 256
#: the largest intermediate image a resize may build in one pass (see _center and
#: _squash_resize); ordinary images stay far below it and take the authors' exact path
MAX_INTERMEDIATE_PIXELS = 16_000_000
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
#: the crops (``ModelCard.crop``) whose fitting is Pillow's alone
FITTED_CROPS = ("caffe", "center", "squash")


@dataclass(frozen=True)
class Fit:
    """How one model fits a frame: its crop kind, input side and resampling filter."""

    crop: str
    input_size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop not in FITTED_CROPS:
            raise ValueError(f"no Pillow fitting for crop {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.input_size < 1:
            raise ValueError(f"an input side of {self.input_size}")

    def __call__(self, image: Image.Image) -> Image.Image:
        """``image`` as the model's ``input_size`` square, 8-bit RGB (a decoder's frames are
        RGB already; other modes are converted first)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return _BY_CROP[self.crop](self, image)


def _caffe(fit: Fit, image: Image.Image) -> Image.Image:
    # Yahoo's classify_nsfw.py: resize to 256x256, JPEG-encode, decode, then crop 224. The
    # network was fitted to JPEG artefacts, so the round trip is part of the model.
    resized = _squash_resize(image, (CAFFE_RESIZE, CAFFE_RESIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as reloaded:
        rgb = reloaded.convert("RGB")
    offset = (CAFFE_RESIZE - fit.input_size) // 2
    return rgb.crop((offset, offset, offset + fit.input_size, offset + fit.input_size))


def _center(fit: Fit, image: Image.Image) -> Image.Image:
    # torchvision Resize(int) on a PIL image: short side to size, long side truncated.
    size = fit.input_size
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    # torchvision CenterCrop rounds the offset.
    left = round((new[0] - size) / 2.0)
    top = round((new[1] - size) / 2.0)
    resample = INTERPOLATIONS[fit.interpolation]
    if new[0] * new[1] <= MAX_INTERMEDIATE_PIXELS:
        resized = image.resize(new, resample=resample)
        return resized.crop((left, top, left + size, top + size))
    # Past that (a 1x100000 strip would become 384 x 38 million pixels) resize only the
    # crop, as a box in source coordinates at the full resize's scale: each output pixel's
    # filter depends on the scale and its centre alone, so the pixels are those of the full
    # resize but for rounding (a level or two where a fixed-point weight rounds the other
    # way); below it, the models' authors' path to the bit.
    scale_x, scale_y = width / new[0], height / new[1]
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    return image.resize((size, size), resample=resample, box=box)


def _squash(fit: Fit, image: Image.Image) -> Image.Image:
    size = fit.input_size
    return _squash_resize(image, (size, size), INTERPOLATIONS[fit.interpolation])


def _squash_resize(
    image: Image.Image, size: tuple[int, int], resample: Image.Resampling
) -> Image.Image:
    """``image.resize(size)``, in two steps where one would build a huge intermediate.

    Pillow resizes rows first, into the new width times every source row: a 1x50,000,000
    strip squashed to 384x384 would take 19 G pixels. Where that intermediate passes both
    the source's size and MAX_INTERMEDIATE_PIXELS, the rows are reduced first (rounding once
    more in between); every other image takes the one-pass path the models' authors ran."""
    if needs_rows_first(image.size, size):
        image = image.resize((image.width, size[1]), resample=resample)
    return image.resize(size, resample=resample)


def needs_rows_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    width, height = source
    intermediate = size[0] * height
    return intermediate > max(MAX_INTERMEDIATE_PIXELS, width * height) and height > size[1]


_BY_CROP = {"caffe": _caffe, "center": _center, "squash": _squash}
