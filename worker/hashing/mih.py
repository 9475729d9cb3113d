"""Multi-index hashing: find hashes within a Hamming radius by exact lookups.

Cut an n-bit hash into ``k`` chunks. Two hashes within distance ``r`` differ in at most ``r``
bits spread over ``k`` chunks, so by pigeonhole some chunk differs in at most ``r // k`` bits:
looking up, for every chunk of the query, its value and every value within that many bit
flips reaches every hash within ``r``, and a full-distance check drops the rest. With
``r + 1`` chunks that is one exact lookup per chunk.

Two indexes use it: the verdict cache's 64-bit pHash index, whose chunk count follows its
radius (``ChunkLayout.for_radius``), and the hash banks' 256-bit PDQ index, laid out as
ThreatExchange's PDQ index is (16 chunks of 16 bits, whatever the radius).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations
from math import comb

__all__ = ["ChunkLayout", "hamming"]


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@cache
def _masks(width: int, flips: int) -> tuple[int, ...]:
    """Every ``width``-bit pattern with at most ``flips`` bits set, zero first."""
    out = [0]
    for bits in range(1, flips + 1):
        out.extend(sum(1 << p for p in positions) for positions in combinations(range(width), bits))
    return tuple(out)


@dataclass(frozen=True)
class ChunkLayout:
    """How a hash is cut into chunks, most significant bits first."""

    widths: tuple[int, ...]

    @classmethod
    def for_radius(cls, radius: int, bits: int = 64) -> ChunkLayout:
        """``radius + 1`` chunks whose widths differ by at most one bit."""
        if not 0 <= radius < bits:
            raise ValueError(f"radius must be in 0..{bits - 1}, got {radius}")
        count = radius + 1
        base, extra = divmod(bits, count)
        return cls(tuple(base + 1 if i < extra else base for i in range(count)))

    @property
    def bits(self) -> int:
        return sum(self.widths)

    @property
    def count(self) -> int:
        return len(self.widths)

    @property
    def radius(self) -> int:
        """The largest radius one exact lookup per chunk finds every match for."""
        return self.count - 1

    @property
    def tag(self) -> str:
        """Names the layout in index keys, so two layouts never share an index."""
        return f"mih{self.count}"

    def values(self, value: int) -> list[int]:
        out: list[int] = []
        shift = self.bits
        for width in self.widths:
            shift -= width
            out.append((value >> shift) & ((1 << width) - 1))
        return out

    def chunks(self, value: int) -> tuple[str, ...]:
        """Each chunk's value in hex, in chunk order: what an entry is indexed under."""
        return tuple(format(chunk, "x") for chunk in self.values(value))

    def probe_count(self, radius: int) -> int:
        flips = max(radius, 0) // self.count
        return sum(comb(width, bits) for width in self.widths for bits in range(flips + 1))

    def probe_values(self, value: int, radius: int) -> list[tuple[int, int]]:
        """(chunk index, chunk value) pairs: every hash within ``radius`` of ``value`` is
        indexed under at least one of them. Callers bound ``probe_count`` first."""
        if not 0 <= radius <= self.bits:
            raise ValueError(f"radius must be in 0..{self.bits}, got {radius}")
        flips = radius // self.count
        return [
            (i, chunk ^ mask)
            for i, (width, chunk) in enumerate(zip(self.widths, self.values(value), strict=True))
            for mask in _masks(width, flips)
        ]
