"""Content and perceptual hashes of an image.

sha256 identifies the exact bytes. pHash and dHash are two independent perceptual hashes
(DCT and gradient based), so a near-match can be required to agree on both. Low-information
images (tiny or nearly flat) get hashes but are flagged: any two of them look alike to a
perceptual hash, so the cache never matches them perceptually.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

__all__ = ["ImageHashes", "hash_image", "sha256_hex"]

MIN_SIDE = 32  # below this a perceptual hash says little
MIN_STDDEV = 4.0  # grey-level spread below which an image counts as flat


@dataclass(frozen=True)
class ImageHashes:
    sha256: str
    phash: str
    dhash: str
    informative: bool


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_image(data: bytes, image: Image.Image, sha256: str | None = None) -> ImageHashes:
    grey = image.convert("L")
    informative = min(grey.size) >= MIN_SIDE and float(np.asarray(grey).std()) >= MIN_STDDEV
    return ImageHashes(
        sha256=sha256 or sha256_hex(data),
        phash=str(imagehash.phash(grey)),
        dhash=str(imagehash.dhash(grey)),
        informative=informative,
    )
