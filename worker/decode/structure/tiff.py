"""TIFF and BigTIFF: walk the chain of IFDs without reading any pixel.

Pillow parses every IFD in Python to count pages, unpacks every numeric array into a tuple,
and builds one decoder call per strip or tile. Counted here: pages (the frame cap), IFD
entries and numeric values (the segment cap), strips and tiles against what the image's size
needs, and tiles far larger than the image (a decoder sizes its buffer from the tile).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.decode.structure.base import Items, Structure, check_frames
from worker.errors import CorruptImage, TooManyPixels

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["walk_tiff"]

# Types whose values Pillow keeps as bytes; every other type becomes one Python object each.
_BYTES_TYPES = frozenset({1, 2, 6, 7})
_INLINE = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the ones a geometry tag uses
_GEOMETRY = frozenset({256, 257, 277, 278, 284, 322, 323})
_OFFSETS = frozenset({273, 324})  # StripOffsets, TileOffsets
#: the largest tile allowed in any image, and in a small one, tiles up to 4x its area
_TILE_FLOOR = 1 << 20


@dataclass(frozen=True)
class _Layout:
    order: str
    big: bool

    @property
    def entry(self) -> str:
        return self.order + ("HHQQ" if self.big else "HHII")

    @property
    def entry_size(self) -> int:
        return 20 if self.big else 12

    @property
    def count(self) -> str:
        return self.order + ("Q" if self.big else "H")

    @property
    def offset(self) -> str:
        return self.order + ("Q" if self.big else "I")


def walk_tiff(data: bytes, limits: DecodeLimits) -> Structure:
    if len(data) < 16:
        return Structure("TIFF")
    order = "<" if data[:2] == b"II" else ">"
    layout = _Layout(order, 0x2B in data[2:4])
    items = Items(limits, "IFD entries and numeric values")
    at = struct.unpack_from(layout.offset, data, 8 if layout.big else 4)[0]
    seen: set[int] = set()
    while at:
        if at in seen:
            raise CorruptImage(f"the TIFF's chain of pages loops back to offset {at}")
        seen.add(at)
        check_frames(len(seen), limits, "pages")
        at = _walk_ifd(data, at, layout, items, len(seen))
    return Structure("TIFF", max(len(seen), 1))


def _walk_ifd(data: bytes, at: int, layout: _Layout, items: Items, page: int) -> int:
    """Check one IFD; the offset of the next one (0: none, or past the end)."""
    head = struct.calcsize(layout.count)
    if at + head > len(data):
        return 0
    entries = struct.unpack_from(layout.count, data, at)[0]
    items.add(entries)
    start, size = at + head, layout.entry_size
    if start + entries * size + struct.calcsize(layout.offset) > len(data):
        return 0
    tags: dict[int, int] = {}
    for index in range(entries):
        tag, kind, count, _ = struct.unpack_from(layout.entry, data, start + index * size)
        if kind not in _BYTES_TYPES:
            items.add(count)
        if tag in _OFFSETS:
            tags[tag] = count
        elif tag in _GEOMETRY and count == 1 and kind in _INLINE:
            inline = start + index * size + (12 if layout.big else 8)
            tags[tag] = struct.unpack_from(layout.order + _INLINE[kind], data, inline)[0]
    _check_layout(tags, page)
    next_at: int = struct.unpack_from(layout.offset, data, start + entries * size)[0]
    return next_at if next_at < len(data) else 0


def _check_layout(tags: dict[int, int], page: int) -> None:
    width, height = tags.get(256, 0), tags.get(257, 0)
    if not width or not height:
        return  # Pillow refuses a page without a size
    planes = tags.get(277, 1) if tags.get(284, 1) == 2 else 1
    if 324 in tags or 322 in tags:
        tile_w, tile_h = tags.get(322, 0), tags.get(323, 0)
        if not tile_w or not tile_h:
            raise CorruptImage(f"page {page} is tiled but declares a {tile_w}x{tile_h} tile")
        tile_px, image_px = tile_w * tile_h, width * height
        if tile_px > max(4 * image_px, _TILE_FLOOR):
            raise TooManyPixels(
                f"page {page} ({width}x{height}) is stored in {tile_w}x{tile_h} tiles of "
                f"{tile_px:,} pixels; tiles may hold up to 4 times the image's pixels, or "
                f"{_TILE_FLOOR:,}"
            )
        needed = -(-width // tile_w) * -(-height // tile_h) * planes
        what, declared = "tiles", tags.get(324, 0)
    else:
        rows = tags.get(278, 0) or height
        needed = -(-height // min(rows, height)) * planes
        what, declared = "strips", tags.get(273, 0)
    if declared > needed:
        raise CorruptImage(
            f"page {page} ({width}x{height}) declares {declared:,} {what}; its size needs "
            f"{needed:,}"
        )
