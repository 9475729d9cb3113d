"""JPEG: count marker segments and scans, skipping entropy-coded data with one NumPy pass.

Pillow reads every marker segment before the first scan in Python, byte by byte through any
junk between them; libjpeg decodes every progressive scan over the whole image, so a few
bytes of end-of-band runs per scan cost a pass over every block. Both are counted here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from worker.decode.structure.base import Items, Structure, u16
from worker.errors import TooComplex

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["walk_jpeg"]

_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class _Markers:
    """Where a marker may start: 0xFF followed by neither a stuffed zero, a restart marker nor
    another fill byte. Found for the whole file at once (a Python loop over the 0xFF bytes of
    entropy-coded data would cost more than decoding a small photo)."""

    def __init__(self, data: bytes) -> None:
        pixels = np.frombuffer(data, dtype=np.uint8)
        at = np.flatnonzero(pixels[:-1] == 0xFF)
        after = pixels[at + 1]
        keep = (after != 0) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))
        self.at = at[keep]
        self.end = len(data)

    def next(self, pos: int) -> int:
        index = int(np.searchsorted(self.at, pos))
        return int(self.at[index]) if index < len(self.at) else self.end


def walk_jpeg(data: bytes, limits: DecodeLimits) -> Structure:
    items = Items(limits, "marker segments (or junk bytes between them)")
    markers: _Markers | None = None
    scans, pos, end = 0, 2, len(data)
    while pos + 1 < end:
        if data[pos] != 0xFF:
            # Junk between segments: Pillow skips it one byte at a time.
            markers = markers or _Markers(data)
            stop = markers.next(pos)
            items.add(stop - pos)
            pos = stop
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        items.add()
        if pos + 4 > end:
            break
        pos += 2 + u16(data, pos + 2)
        if marker == _SOS:
            scans += 1
            if scans > limits.max_scans:
                raise TooComplex(
                    f"the JPEG has over {limits.max_scans} scans; the limit is "
                    f"{limits.max_scans} (MODQ_MAX_JPEG_SCANS)"
                )
            markers = markers or _Markers(data)
            pos = markers.next(pos)
    return Structure("JPEG")
