"""PDQ, the 256-bit perceptual hash that hash-sharing programmes exchange.

A bank only helps if the hashes modq computes are the ones partners computed for the same
image, so hashing follows Meta's reference hasher: images larger than 512 pixels on a side are
first shrunk to 512 x 512 (the reference does it for speed; the hash itself squashes every image
to 64 x 64), then ``pdqhash`` hashes the RGB pixels. The hex form is the reference's: 64 hex
digits, most significant bit first.

``quality`` (0-100) says how much structure the image has. Below ``PDQ_QUALITY_MIN`` (50, the
threshold PDQ's authors give) a hash is too uninformative to match on: flat or nearly flat
images all hash alike. Such hashes are never banked and never looked up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "HASH_BITS",
    "PDQ_MAX_DISTANCE",
    "PDQ_QUALITY_MIN",
    "PdqHash",
    "format_pdq",
    "parse_pdq",
    "pdq_hash",
]

HASH_BITS = 256
PDQ_QUALITY_MIN = 50
PDQ_MAX_DISTANCE = 31  # the match threshold ThreatExchange recommends for PDQ
_HEX_DIGITS = HASH_BITS // 4
_HEX = frozenset("0123456789abcdefABCDEF")
_DOWNSAMPLE_SIDE = 512  # as the reference hasher (pdq/cpp/io/pdqio.cpp, DOWNSAMPLE_DIMS)


@dataclass(frozen=True)
class PdqHash:
    hex: str  # 64 lowercase hex digits
    quality: int


def parse_pdq(text: str) -> int:
    """The value of a PDQ hash written as 64 hex digits (either case)."""
    if len(text) != _HEX_DIGITS or not _HEX.issuperset(text):
        raise ValueError(f"not a PDQ hash (64 hex digits): {text[:80]!r}")
    return int(text, 16)


def format_pdq(value: int) -> str:
    return format(value, "064x")


def pdq_hash(image: Image.Image) -> PdqHash:
    """The PDQ hash and quality of an RGB image (other modes are converted first)."""
    import pdqhash

    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > _DOWNSAMPLE_SIDE:
        image = image.resize((_DOWNSAMPLE_SIDE, _DOWNSAMPLE_SIDE), Image.Resampling.BOX)
    bits, quality = pdqhash.compute(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)))
    # pdqhash returns the bits most significant first, as the reference's hex string has them.
    packed = np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()
    return PdqHash(packed.hex(), int(quality))
