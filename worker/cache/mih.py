"""Multi-index hashing: find 64-bit perceptual hashes within a Hamming radius by exact lookups.

Split the hash into ``r + 1`` chunks. A hash within distance ``r`` of the query differs in at
most ``r`` bits, so by pigeonhole at least one of the ``r + 1`` chunks is identical: looking up
each chunk of the query exactly finds every candidate, and a full-distance check drops the
rest. Chunk widths differ by at most one bit. The layout depends only on the chunk count, which
every index key carries, so a cache whose radius changed never reads another layout's index.

A query for a larger radius than the layout's still finds every match: with ``k`` chunks, a
hash within ``r`` differs from the query by at most ``r // k`` bits in some chunk, so probing
each chunk's values within that many bit flips covers it (``ChunkLayout.probes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb

__all__ = ["DEFAULT_RADIUS", "HASH_BITS", "MAX_PROBES", "ChunkLayout", "hamming", "parse_hash"]

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


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class ChunkLayout:
    """How a 64-bit hash is cut into chunks, most significant bits first."""

    widths: tuple[int, ...]

    @classmethod
    def for_radius(cls, radius: int) -> ChunkLayout:
        if not 0 <= radius < HASH_BITS:
            raise ValueError(f"perceptual radius must be in 0..{HASH_BITS - 1}, got {radius}")
        count = radius + 1
        base, extra = divmod(HASH_BITS, count)
        return cls(tuple(base + 1 if i < extra else base for i in range(count)))

    @property
    def count(self) -> int:
        return len(self.widths)

    @property
    def radius(self) -> int:
        """The largest radius this layout finds every match for."""
        return self.count - 1

    @property
    def tag(self) -> str:
        """Names the layout in index keys, so two layouts never share an index."""
        return f"mih{self.count}"

    def _values(self, value: int) -> list[int]:
        out: list[int] = []
        shift = HASH_BITS
        for width in self.widths:
            shift -= width
            out.append((value >> shift) & ((1 << width) - 1))
        return out

    def chunks(self, value: int) -> tuple[str, ...]:
        """Each chunk's value in hex, in chunk order: what an entry is indexed under."""
        return tuple(format(chunk, "x") for chunk in self._values(value))

    def probe_count(self, radius: int) -> int:
        flips = radius // self.count
        return sum(comb(width, bits) for width in self.widths for bits in range(flips + 1))

    def probes(self, value: int, radius: int) -> list[tuple[int, str]]:
        """(chunk index, chunk in hex) pairs: every hash within ``radius`` of ``value`` is
        indexed under at least one of them. Exactly ``chunks(value)`` when ``radius`` is at
        most the layout's own radius."""
        if not 0 <= radius <= HASH_BITS:
            raise ValueError(f"perceptual radius must be in 0..{HASH_BITS}, got {radius}")
        if self.probe_count(radius) > MAX_PROBES:
            raise ValueError(
                f"radius {radius} needs more than {MAX_PROBES} lookups in a {self.count}-chunk "
                f"index; build the cache for radius {radius}"
            )
        flips = radius // self.count
        out: list[tuple[int, str]] = []
        for i, (width, chunk) in enumerate(zip(self.widths, self._values(value), strict=True)):
            for bits in range(flips + 1):
                for positions in combinations(range(width), bits):
                    probe = chunk
                    for position in positions:
                        probe ^= 1 << position
                    out.append((i, format(probe, "x")))
        return out
