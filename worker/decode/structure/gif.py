"""GIF: walk the blocks without decoding LZW data.

Pillow reads extension blocks and their sub-blocks in Python, skips unknown bytes one at a
time, and composes every frame it passes on the whole canvas, which a frame placed past the
logical screen grows. Counted here: blocks, extension sub-blocks and junk bytes (one cap),
frames, the canvas each frame leaves, and the canvas pixels of the walk to the last frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.decode.structure.base import Items, Structure, check_canvas, check_frames, u16

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["walk_gif"]


def _skip_sub_blocks(data: bytes, pos: int, items: Items | None) -> int:
    end = len(data)
    while pos < end:
        size = data[pos]
        pos += 1
        if not size:
            break
        if items is not None:
            items.add()
        pos += size
    return pos


def _colour_table(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def walk_gif(data: bytes, limits: DecodeLimits) -> Structure:
    if len(data) < 13:
        return Structure("GIF")
    items = Items(limits, "blocks, extension sub-blocks or junk bytes")
    width, height = u16(data, 6, "<"), u16(data, 8, "<")
    pos, end = 13 + _colour_table(data[10]), len(data)
    frames = walk = 0
    while pos < end:
        kind = data[pos]
        if kind == 0x3B:  # trailer
            break
        items.add()
        if kind == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2, items)
        elif kind == 0x2C and pos + 10 <= end:
            frames += 1
            check_frames(frames, limits)
            left, top = u16(data, pos + 1, "<"), u16(data, pos + 3, "<")
            right, bottom = left + u16(data, pos + 5, "<"), top + u16(data, pos + 7, "<")
            width, height = max(width, right), max(height, bottom)
            check_canvas(width, height, limits, f"the canvas after frame {frames}")
            walk += width * height
            pos += 10 + _colour_table(data[pos + 9]) + 1  # + LZW minimum code size
            pos = _skip_sub_blocks(data, pos, None)
        else:
            pos += 1  # junk, or a descriptor cut short: Pillow steps over it byte by byte
    return Structure("GIF", max(frames, 1), walk if frames > 1 else 0)
