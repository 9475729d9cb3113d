"""Multi-index hashing for 256-bit PDQ hashes, laid out as ThreatExchange's PDQ index does.

A hash is cut into 16 chunks of 16 bits, most significant first. Two hashes within distance
``r`` differ in ``r`` bits spread over 16 chunks, so by pigeonhole some chunk differs in at most
``r // 16`` bits. Probing, for every chunk of the query, its value and every value within that
many bit flips therefore reaches every hash within ``r`` (for the default radius 31: one flip,
16 x 17 = 272 probes); a full-distance check then drops the candidates that are farther.

The layout is fixed, whatever the radius, so an index never has to be rebuilt: a larger radius
only costs more probes, and past ``MAX_PROBES`` it is refused. The chunking and probing are
``worker.hashing.mih``'s, shared with the verdict cache's 64-bit index (which instead sizes
its chunks for one radius).
"""

from __future__ import annotations

import threading

from worker.errors import ConfigError
from worker.hashing.mih import ChunkLayout, hamming
from worker.hashing.pdq import HASH_BITS

__all__ = [
    "CHUNKS",
    "CHUNK_BITS",
    "MAX_PROBES",
    "MultiIndex",
    "chunk_values",
    "flips_for",
    "probe_count",
    "probes",
]

CHUNK_BITS = 16
CHUNKS = HASH_BITS // CHUNK_BITS
MAX_PROBES = 4096  # radius 47 (2 flips, 2,192 probes) passes; radius 48 (11,152) does not


LAYOUT = ChunkLayout((CHUNK_BITS,) * CHUNKS)


def chunk_values(value: int) -> list[int]:
    """The 16-bit chunks of a hash, most significant first."""
    return LAYOUT.values(value)


def probe_count(max_distance: int) -> int:
    return LAYOUT.probe_count(max_distance)


def flips_for(max_distance: int) -> int:
    """The bit flips each chunk is probed with for this radius; refuses unusable radii."""
    if not 0 <= max_distance <= HASH_BITS:
        raise ConfigError(f"PDQ match distance must be in 0..{HASH_BITS}, got {max_distance}")
    if probe_count(max_distance) > MAX_PROBES:
        raise ConfigError(
            f"PDQ match distance {max_distance} needs {probe_count(max_distance)} index lookups "
            f"per bank (the limit is {MAX_PROBES}); use a distance below "
            f"{_largest_radius() + 1} (31 is the usual one)"
        )
    return max_distance // CHUNKS


def _largest_radius() -> int:
    radius = 0
    while probe_count(radius + 1) <= MAX_PROBES:
        radius += 1
    return radius


def probes(value: int, max_distance: int) -> list[tuple[int, int]]:
    """(chunk index, chunk value) pairs under which every hash within ``max_distance`` of
    ``value`` is indexed."""
    flips_for(max_distance)
    return LAYOUT.probe_values(value, max_distance)


class MultiIndex:
    """An in-memory multi-index over 256-bit hashes (the memory bank store's index)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[int] = set()
        self._chunks: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: int) -> bool:
        """Index ``value``; False when it was already there."""
        with self._lock:
            if value in self._values:
                return False
            self._values.add(value)
            for key in enumerate(chunk_values(value)):
                self._chunks.setdefault(key, []).append(value)
            return True

    def within(self, value: int, max_distance: int) -> dict[int, int]:
        """Every indexed hash within ``max_distance`` of ``value``, with its distance."""
        keys = probes(value, max_distance)
        with self._lock:
            candidates = {c for key in keys for c in self._chunks.get(key, ())}
        distances = ((c, hamming(value, c)) for c in candidates)
        return {c: d for c, d in distances if d <= max_distance}
