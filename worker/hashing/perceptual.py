"""Content and perceptual hashes of an image.

sha256 identifies the exact bytes. pHash and dHash are two independent perceptual hashes
(DCT and gradient based), so a near-match can be required to agree on both. Low-information
images (tiny or nearly flat) get hashes but are flagged: any two of them look alike to a
perceptual hash, so the cache never matches them perceptually.

Both perceptual hashes are taken from the decoded frame reduced by a whole factor (pixel
blocks averaged) to no less than 128 pixels a side: pHash looks at 32x32 and dHash at 9x8
anyway, and reducing first costs about a seventh of hashing the frame itself, with near
duplicates as close as before. ``HASH_VERSION`` names the method and is part of every verdict
cache key, so an entry hashed another way is never compared with these.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

__all__ = [
    "HASH_VERSION",
    "ImageHashes",
    "hash_image",
    "hash_reduced",
    "reduce_for_hashing",
    "reduced_size",
    "sha256_hex",
]

#: 2: hashed from the reduced frame (1: from the decoded frame itself)
HASH_VERSION = 2
MIN_SIDE = 32  # below this a perceptual hash says little
MIN_STDDEV = 4.0  # grey-level spread below which an image counts as flat
_REDUCED_SIDE = 128


@dataclass(frozen=True)
class ImageHashes:
    sha256: str
    phash: str
    dhash: str
    informative: bool


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_image(data: bytes, image: Image.Image, sha256: str | None = None) -> ImageHashes:
    return hash_reduced(reduce_for_hashing(image), image.size, sha256 or sha256_hex(data))


def reduce_for_hashing(image: Image.Image) -> Image.Image:
    """The frame reduced by a whole factor to no less than 128 pixels a side, in grey: all the
    perceptual hashes look at (a decoder process returns it in place of the frame)."""
    factor = _factor(image.size)
    return (image.reduce(factor) if factor > 1 else image).convert("L")


def reduced_size(frame_size: tuple[int, int]) -> tuple[int, int]:
    """The size ``reduce_for_hashing`` gives a frame of ``frame_size`` (Pillow rounds up)."""
    factor = _factor(frame_size)
    width, height = frame_size
    return -(-width // factor), -(-height // factor)


def _factor(size: tuple[int, int]) -> int:
    return max(1, min(size) // _REDUCED_SIDE)


def hash_reduced(grey: Image.Image, frame_size: tuple[int, int], sha256: str) -> ImageHashes:
    """The hashes of a frame of ``frame_size`` from its reduction (``reduce_for_hashing``)."""
    informative = min(frame_size) >= MIN_SIDE and float(np.asarray(grey).std()) >= MIN_STDDEV
    return ImageHashes(
        sha256=sha256,
        phash=str(imagehash.phash(grey)),
        dhash=str(imagehash.dhash(grey)),
        informative=informative,
    )
