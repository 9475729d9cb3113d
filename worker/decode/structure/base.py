"""What a structural walk reports, and the counter that stops it at a cap."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.errors import TooComplex, TooManyFrames, TooManyPixels

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["Items", "Structure", "check_canvas", "check_frames", "u16", "u32"]


@dataclass(frozen=True)
class Structure:
    """What the walk found: enough to bound the decode before it starts."""

    format: str
    frames: int = 1
    #: canvas pixels composed while stepping through every frame (0 where seeking to a frame
    #: decodes none of the frames before it, as in a TIFF)
    walk_pixels: int = 0


class Items:
    """Counts what a decoder walks one item at a time (marker segments, chunks, blocks, IFD
    entries, RLE commands) and refuses the image past the cap."""

    def __init__(self, limits: DecodeLimits, what: str) -> None:
        self.cap = limits.max_segments
        self.what = what
        self.count = 0

    def add(self, count: int = 1) -> None:
        self.count += count
        if self.count > self.cap:
            raise TooComplex(
                f"the image has over {self.cap:,} {self.what}; the limit is {self.cap:,} "
                "(MODQ_MAX_SEGMENTS)"
            )


def check_frames(frames: int, limits: DecodeLimits, what: str = "frames") -> None:
    if frames > limits.max_frames:
        raise TooManyFrames(
            f"the image has over {limits.max_frames:,} {what}; the limit is {limits.max_frames:,}"
        )


def check_canvas(width: int, height: int, limits: DecodeLimits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"{what} is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{limits.max_pixels:,}"
        )


def u16(data: bytes, pos: int, order: str = ">") -> int:
    value: int = struct.unpack_from(order + "H", data, pos)[0]
    return value


def u32(data: bytes, pos: int, order: str = ">") -> int:
    value: int = struct.unpack_from(order + "I", data, pos)[0]
    return value
