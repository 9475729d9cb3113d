"""A cheap, capped walk of an image's structure before Pillow decodes any pixel.

The pixel and frame caps bound what a decode keeps, not what it walks: a few MB can hold
50,000 progressive JPEG scans (each a pass over every block), a million PNG chunks or JPEG
marker segments (each handled in Python), a TIFF of a hundred thousand pages or a million
strips, or an animation whose frame walk composes billions of canvas pixels. Each walker
reads only markers, chunk and block headers and IFDs (no LZW, no zlib, no entropy decoding),
stops at the first cap it passes and raises the typed error; a structure it cannot follow
(truncated, odd) is left to Pillow, which refuses what it cannot decode.

    format  walked                                         caps (DecodeLimits)
    JPEG    marker segments, junk bytes, SOS scans          max_segments, max_scans
    PNG     chunks, acTL/fcTL frames                        max_segments, max_frames
    GIF     blocks, extension sub-blocks, frames, canvas    max_segments, max_frames,
                                                            max_pixels
    WEBP    RIFF chunks, ANMF frames, VP8X canvas           max_segments, max_frames
    TIFF    IFD chain (loops), entries, numeric values,     max_frames, max_segments,
            strips and tiles against the size, tile area    max_pixels
    BMP     run-length commands                             max_segments

It also reports what the frame walk will compose (``Structure.walk_pixels``), which decode()
holds to ``max_animation_pixels``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.decode.structure.base import Structure
from worker.decode.structure.bmp import walk_bmp
from worker.decode.structure.gif import walk_gif
from worker.decode.structure.jpeg import walk_jpeg
from worker.decode.structure.png import walk_png
from worker.decode.structure.tiff import walk_tiff
from worker.decode.structure.webp import walk_webp

if TYPE_CHECKING:
    from worker.decode import DecodeLimits

__all__ = ["Structure", "check_structure"]

_Walker = Callable[[bytes, "DecodeLimits"], Structure]

# The magic numbers Pillow's allowed plugins accept.
_BY_MAGIC: tuple[tuple[tuple[bytes, ...], _Walker], ...] = (
    ((b"\xff\xd8\xff",), walk_jpeg),
    ((b"\x89PNG\r\n\x1a\n",), walk_png),
    ((b"GIF87a", b"GIF89a"), walk_gif),
    ((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"MM*\x00", b"II\x00*"), walk_tiff),
    ((b"BM",), walk_bmp),
)


def check_structure(data: bytes, limits: DecodeLimits) -> Structure | None:
    """Walk ``data``'s structure within ``limits``; None for a format this does not know
    (the allowlist refuses it at open)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return walk_webp(data, limits)
    for magics, walker in _BY_MAGIC:
        if data.startswith(magics):
            return walker(data, limits)
    return None
