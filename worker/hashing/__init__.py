"""Content and perceptual hashes, and the multi-index hashing that finds near ones.

- ``perceptual``: sha256, and pHash + dHash from the reduced frame (the verdict cache's);
- ``pdq``: PDQ, the 256-bit hash of the known-bad hash banks;
- ``mih``: multi-index hashing (chunks and bit-flip probes), shared by both indexes;
- ``phash_index``: the verdict cache's 64-bit index layout;
- ``pdq_index``: the banks' 256-bit index, laid out as ThreatExchange's.
"""

from worker.hashing.perceptual import (
    HASH_VERSION,
    ImageHashes,
    hash_image,
    hash_reduced,
    reduce_for_hashing,
    reduced_size,
    sha256_hex,
)

__all__ = [
    "HASH_VERSION",
    "ImageHashes",
    "hash_image",
    "hash_reduced",
    "reduce_for_hashing",
    "reduced_size",
    "sha256_hex",
]
