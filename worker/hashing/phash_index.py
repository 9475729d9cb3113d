"""The verdict cache's 64-bit perceptual-hash index: multi-index hashing (``worker.hashing.mih``)
with ``radius + 1`` chunks, so a lookup at the cache's own radius is one exact probe per chunk.

The layout depends only on the chunk count, which every index key carries, so a cache whose
radius changed never reads another layout's index. A query for a larger radius than the
layout's still finds every match by probing each chunk within ``radius // chunks`` bit flips
(``probes``), up to ``MAX_PROBES`` lookups.
"""

from __future__ import annotations

from worker.hashing.mih import ChunkLayout

__all__ = [
    "DEFAULT_RADIUS",
    "HASH_BITS",
    "MAX_PROBES",
    "layout_for",
    "parse_hash",
    "probes",
]

HASH_BITS = 64
_HASH_HEX_DIGITS = HASH_BITS // 4
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
DEFAULT_RADIUS = 6  # the default of Settings.perceptual_radius
MAX_PROBES = 4096  # index lookups one query may make; past it, index for a larger radius


def parse_hash(text: str) -> int:
    """The 64-bit value of a hex hash as imagehash writes it (16 hex digits)."""
    if len(text) != _HASH_HEX_DIGITS or not _HEX_DIGITS.issuperset(text):
        raise ValueError(f"not a 64-bit hex hash: {text!r}")
    return int(text, 16)


def layout_for(radius: int) -> ChunkLayout:
    if not 0 <= radius < HASH_BITS:
        raise ValueError(f"perceptual radius must be in 0..{HASH_BITS - 1}, got {radius}")
    return ChunkLayout.for_radius(radius, HASH_BITS)


def probes(layout: ChunkLayout, value: int, radius: int) -> list[tuple[int, str]]:
    """(chunk index, chunk in hex) pairs: every hash within ``radius`` of ``value`` is indexed
    under at least one of them; exactly ``layout.chunks(value)`` when ``radius`` is at most
    the layout's own radius."""
    if not 0 <= radius <= HASH_BITS:
        raise ValueError(f"perceptual radius must be in 0..{HASH_BITS}, got {radius}")
    if layout.probe_count(radius) > MAX_PROBES:
        raise ValueError(
            f"radius {radius} needs more than {MAX_PROBES} lookups in a {layout.count}-chunk "
            f"index; build the cache for radius {radius}"
        )
    return [(i, format(chunk, "x")) for i, chunk in layout.probe_values(value, radius)]
