"""Turn untrusted bytes into RGB frames, refusing anything outside the limits before decoding.

Order matters: the byte cap is checked before Pillow sees the data, then a capped walk of the
structure (``worker.decode.structure``: scans, marker segments, chunks, pages, strips, tiles,
frames)
before Pillow parses it, the format allowlist at open (Pillow tries only the allowed plugins),
the pixel, aspect-ratio and frame caps from the header and the canvas pixels the frame walk
will compose before any pixel is decoded, and only then are frames decoded, EXIF-transposed
and converted to RGB.

The pixel cap bounds memory per image: one frame may not exceed it, and neither may the sampled
frames together (each is kept as RGB until the model has seen it). A MemoryError is not a fact
about the image, so it becomes the retryable ``resource_exhausted``, never ``corrupt_image``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from worker.config import DecodeLimits
from worker.decode.structure import Structure, check_structure
from worker.errors import (
    CorruptImage,
    EmptyImage,
    ExtremeAspectRatio,
    ImageTooLarge,
    ModqError,
    ResourceExhausted,
    TooManyFrames,
    TooManyPixels,
    UnsupportedFormat,
)

__all__ = ["ALLOWED_FORMATS", "DecodeLimits", "DecodedImage", "decode", "sample_indices"]

# Pillow's format names. MPO, the multi-picture JPEG many phones write, opens through JPEG.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Truncated files are refused, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # register every plugin now, so the allowlist can name them all


@dataclass(frozen=True)
class DecodedImage:
    """Decoded RGB frames (one for a still image, evenly sampled ones for an animation)."""

    frames: tuple[Image.Image, ...]
    format: str
    width: int
    height: int
    frame_count: int


def sample_indices(frame_count: int, wanted: int) -> list[int]:
    """Evenly spaced frame indices, always including the first and the last."""
    if frame_count <= wanted:
        return list(range(frame_count))
    if wanted == 1:
        return [0]
    step = (frame_count - 1) / (wanted - 1)
    return sorted({round(i * step) for i in range(wanted)})


def decode(data: bytes, limits: DecodeLimits, draft_size: int | None = None) -> DecodedImage:
    """Decode ``data`` within ``limits``.

    ``draft_size`` lets JPEG decode at a reduced scale whose both sides stay at least
    ``draft_size`` pixels (libjpeg's DCT scaling: much faster on large photos).
    """
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {limits.max_bytes}")
    structure = _check_structure(data, limits)
    image = _open(data)
    try:
        return _decode_frames(image, limits, draft_size, structure)
    except ModqError:
        raise
    except MemoryError as exc:
        # Out of memory under load: as corrupt_image a valid upload would be refused for good.
        raise ResourceExhausted("out of memory while decoding; retry later") from exc
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from exc
    except Exception as exc:
        # Pillow's plugins raise whatever their parser hits on malformed input (TypeError,
        # KeyError, IndexError, struct.error …): all of it means "not a decodable image".
        raise CorruptImage(f"cannot decode the image: {type(exc).__name__}: {exc}") from exc
    finally:
        image.close()


def _check_structure(data: bytes, limits: DecodeLimits) -> Structure | None:
    try:
        return check_structure(data, limits)
    except ModqError:
        raise
    except Exception as exc:  # a walker bug must not let the image past unchecked
        raise CorruptImage(
            f"cannot read the image's structure: {type(exc).__name__}: {exc}"
        ) from exc


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # The bomb check below is ours; Pillow's own warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedFormat(
            f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except MemoryError as exc:
        raise ResourceExhausted("out of memory while reading the header; retry later") from exc
    except Exception as exc:  # any parser failure on the header
        raise CorruptImage(f"cannot read the image header: {type(exc).__name__}: {exc}") from exc


def _decode_frames(
    image: Image.Image, limits: DecodeLimits, draft_size: int | None, structure: Structure | None
) -> DecodedImage:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"the image declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"the image declares {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels}"
        )
    fmt = image.format or "unknown"
    frame_count = _frame_count(image, limits)
    # MPO's extra frames are depth maps or previews, not animation: score the primary image.
    indices = [0] if fmt == "MPO" else sample_indices(frame_count, limits.sample_frames)
    if len(indices) > 1:
        _check_walk(frame_count, width, height, limits, structure)
    if len(indices) * width * height > limits.max_pixels:
        raise TooManyPixels(
            f"the {len(indices)} sampled frames of {width}x{height} hold "
            f"{len(indices) * width * height} pixels together; the limit is {limits.max_pixels}"
        )
    _check_aspect_ratio(width, height, limits)
    frames = tuple(_frames(image, fmt, indices, limits, draft_size))
    return DecodedImage(frames, fmt, width, height, frame_count)


def _check_aspect_ratio(width: int, height: int, limits: DecodeLimits) -> None:
    # A resize of a 1x100000 strip to a model's square input is cheap only if done with care;
    # every resize on the way (hashes, previews, other models) would have to take that care.
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ExtremeAspectRatio(
            f"the image is {width}x{height}, an aspect ratio of {ratio:,.0f}:1; the limit is "
            f"{limits.max_aspect_ratio:g}:1"
        )


def _check_walk(
    frame_count: int, width: int, height: int, limits: DecodeLimits, structure: Structure | None
) -> None:
    """Reaching the last sampled frame decodes every frame before it on the whole canvas
    (GIF, APNG, WebP): bound the pixels that walk composes, as the structure walk found them
    (a GIF's canvas can grow frame by frame) or from the header's canvas."""
    walk = structure.walk_pixels if structure is not None else frame_count * width * height
    if walk > limits.max_animation_pixels:
        raise TooManyPixels(
            f"reaching the last of {frame_count} frames composes {walk:,} canvas pixels "
            f"({width}x{height} and up); the limit is {limits.max_animation_pixels:,}"
        )


def _frame_count(image: Image.Image, limits: DecodeLimits) -> int:
    if not getattr(image, "is_animated", False):
        return 1
    count = int(getattr(image, "n_frames", 1))
    if count > limits.max_frames:
        raise TooManyFrames(f"the image has {count} frames; the limit is {limits.max_frames}")
    return count


def _frames(
    image: Image.Image,
    fmt: str,
    indices: list[int],
    limits: DecodeLimits,
    draft_size: int | None,
) -> Iterator[Image.Image]:
    kept = 0
    for index in indices:
        if index:
            _step_to(image, index, limits)
        elif draft_size and fmt in ("JPEG", "MPO"):
            image.draft("RGB", (draft_size, draft_size))
        # A GIF frame may grow the canvas past the header's size: count what is really kept.
        kept += image.width * image.height
        if kept > limits.max_pixels:
            raise TooManyPixels(
                f"the sampled frames up to frame {index} hold {kept} pixels together; "
                f"the limit is {limits.max_pixels}"
            )
        frame = ImageOps.exif_transpose(image) if index == 0 else image.copy()
        yield _to_rgb(frame)


def _step_to(image: Image.Image, index: int, limits: DecodeLimits) -> None:
    # Step frame by frame: Pillow decodes the frames it passes, and any of them may declare a
    # larger canvas than the header did.
    for step in range(image.tell() + 1, index + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(step)
        width, height = image.size
        if width * height > limits.max_pixels:
            raise TooManyPixels(
                f"frame {step} is {width}x{height}; the limit is {limits.max_pixels} pixels"
            )


def _to_rgb(frame: Image.Image) -> Image.Image:
    if frame.mode in ("I;16", "I;16B", "I;16L", "I"):
        frame = _to_8_bit(frame)
    rgb = frame.convert("RGB")
    rgb.load()
    return rgb


def _to_8_bit(frame: Image.Image) -> Image.Image:
    """16-bit greyscale scaled to 8 bits: Pillow's convert("RGB") clips at 255, which turns a
    normal photo white (and would let a crafted upload hide from the model). 32-bit "I" images
    holding 8-bit values are kept as they are; others are scaled as 16-bit ones, values past
    16 bits (or below 0) read as white (or black)."""
    wide = np.asarray(frame)
    shift = 8 if frame.mode != "I" or wide.max(initial=0) > 255 else 0
    # In the image's own integer width: int64 copies would cost 16 bytes a pixel, over a GiB
    # at the pixel cap; shifting first leaves only 0..255 (and negatives) to clip, in place.
    narrow = wide >> shift
    np.clip(narrow, 0, 255, out=narrow)
    return Image.fromarray(narrow.astype(np.uint8))
