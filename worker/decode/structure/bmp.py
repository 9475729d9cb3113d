"""BMP: Pillow decodes run-length-encoded BMPs in Python, one command (and, for 4-bit runs,
one pixel) at a time: count them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.decode.structure.base import Items, Structure, u16, u32

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["walk_bmp"]

_RLE8, _RLE4 = 1, 2


def walk_bmp(data: bytes, limits: DecodeLimits) -> Structure:
    if len(data) < 34 or u32(data, 14, "<") < 40:
        return Structure("BMP")  # the OS/2 header has no compression field
    compression = u32(data, 30, "<")
    if compression not in (_RLE8, _RLE4):
        return Structure("BMP")
    items = Items(limits, "run-length commands")
    offset = u32(data, 10, "<")
    items.add(max(0, len(data) - offset) // 2)
    if compression == _RLE4 and u16(data, 28, "<") == 4:
        width = abs(int.from_bytes(data[18:22], "little", signed=True))
        height = abs(int.from_bytes(data[22:26], "little", signed=True))
        # Pillow's 4-bit runs cost a Python step per pixel, about a tenth of a command.
        items.add(width * height // 10)
    return Structure("BMP")
