"""WebP: count RIFF chunks and animation frames; the canvas comes from VP8X."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.decode.structure.base import Items, Structure, check_frames, u32

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["walk_webp"]


def _u24(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 3], "little")


def walk_webp(data: bytes, limits: DecodeLimits) -> Structure:
    items = Items(limits, "chunks")
    width = height = frames = 0
    pos, end = 12, min(len(data), 8 + u32(data, 4, "<"))
    while pos + 8 <= end:
        items.add()
        kind, size = data[pos : pos + 4], u32(data, pos + 4, "<")
        if kind == b"VP8X" and size >= 10:
            width, height = _u24(data, pos + 12) + 1, _u24(data, pos + 15) + 1
        elif kind == b"ANMF":
            frames += 1
            check_frames(frames, limits)
        pos += 8 + size + (size & 1)
    if frames <= 1:
        return Structure("WEBP")
    # libwebp composes every frame on the whole canvas to reach the next.
    return Structure("WEBP", frames, frames * width * height)
