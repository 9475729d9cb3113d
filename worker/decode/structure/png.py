"""PNG and APNG: count chunks (Pillow handles each in Python) and the animation's frames."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.decode.structure.base import Items, Structure, check_frames, u32

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["walk_png"]


def walk_png(data: bytes, limits: DecodeLimits) -> Structure:
    items = Items(limits, "chunks")
    width = height = 0
    declared = controls = 0
    pos, end = 8, len(data)
    while pos + 12 <= end:
        items.add()
        length, kind = u32(data, pos), data[pos + 4 : pos + 8]
        if kind == b"IHDR" and pos + 16 <= end:
            width, height = u32(data, pos + 8), u32(data, pos + 12)
        elif kind == b"acTL" and length >= 4:
            declared = u32(data, pos + 8)
        elif kind == b"fcTL":
            controls += 1
        elif kind == b"IEND":
            break
        pos += 12 + length
    if not declared:
        return Structure("PNG")
    # Pillow trusts acTL's count; a file may hold more frame controls than it declares.
    frames = max(declared, controls)
    check_frames(frames, limits)
    return Structure("PNG", frames, frames * width * height)
