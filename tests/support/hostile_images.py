"""Generators of hostile images: valid headers, hostile counts and sizes, a few MB at most.

Each one builds the structure a decoder must walk before it can refuse or finish: a JPEG of
tens of thousands of progressive scans or a million marker segments, a PNG of a million
chunks, a TIFF of a hundred thousand pages or a million strips or one 65520x65520 tile in a
16x16 image, animations whose frame walk touches billions of canvas pixels, and images of an
extreme aspect ratio. ``HOSTILE`` names the worst instance of each class; the structure-aware
fuzzer (``tests/support/fuzz_decode.py``) draws the same generators with random counts.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = [
    "AT_CAPS",
    "HOSTILE",
    "apng_frames",
    "bmp_rle_commands",
    "gif_extensions",
    "gif_frames",
    "gif_growing_canvas",
    "jpeg_progressive",
    "jpeg_segments",
    "png_chunks",
    "png_strip",
    "tiff_huge_tile",
    "tiff_ifd_loop",
    "tiff_pages",
    "tiff_strips",
    "webp_frames",
]


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# --- JPEG ----------------------------------------------------------------------------------


class _Bits:
    """An entropy-coded segment: bits MSB first, 0xFF stuffed, padded with ones."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.count = 0

    def put(self, value: int, length: int) -> None:
        for shift in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> shift) & 1)
            self.count += 1
            if self.count == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)
                self.acc = self.count = 0

    def flush(self) -> bytes:
        if self.count:
            self.put((1 << (8 - self.count)) - 1, 8 - self.count)
        return bytes(self.out)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _one_code_table(table_class: int, symbol: int) -> bytes:
    """A Huffman table holding one symbol, coded as the single bit 0."""
    return _segment(0xC4, bytes([table_class << 4]) + bytes([1] + [0] * 15) + bytes([symbol]))


def jpeg_progressive(scans: int, side: int = 4096) -> bytes:
    """A greyscale progressive JPEG of ``side``x``side`` whose DC scan is followed by ``scans``
    AC scans, each covering every block with a few end-of-band runs (a few bytes a scan;
    libjpeg walks every block of the image in each one)."""
    blocks = ((side + 7) // 8) ** 2
    head = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64))
    head += _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
    head += _one_code_table(0, 0x00)  # DC: difference category 0 only
    head += _one_code_table(1, 0xE0)  # AC: EOB14, a run of 16384 + 14 extra bits of blocks
    dc = _Bits()
    for _ in range(blocks):
        dc.put(0, 1)
    body = [_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + dc.flush()]
    ac = _Bits()
    for _ in range(-(-blocks // 32767)):
        ac.put(0, 1)
        ac.put(0x3FFF, 14)
    run = ac.flush()
    scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + run
    return head + b"".join(body) + scan * scans + b"\xff\xd9"


def jpeg_segments(count: int, marker: int = 0xFE) -> bytes:
    """A small valid JPEG with ``count`` empty COM (or APPn) segments before its frame header."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    data = _encode(image, "JPEG", quality=80)
    return data[:2] + struct.pack(">BBH", 0xFF, marker, 2) * count + data[2:]


# --- PNG -----------------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_parts(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(signature + IHDR, the chunks up to IEND, IEND) of a PNG Pillow wrote."""
    ihdr_end = 8 + 12 + 13
    return data[:ihdr_end], data[ihdr_end:-12], data[-12:]


def png_chunks(count: int, after_data: bool = False) -> bytes:
    """A small valid PNG with ``count`` empty private ancillary chunks, before or after IDAT."""
    image = Image.new("RGB", (16, 16), (40, 90, 160))
    head, body, end = _png_parts(_encode(image, "PNG"))
    filler = _chunk(b"prVt", b"") * count
    return head + (body + filler if after_data else filler + body) + end


def png_strip(width: int, height: int) -> bytes:
    """A greyscale PNG of ``width``x``height`` (1x100000 is under 1 KB): an extreme aspect
    ratio that a resize-then-crop would blow up to ``384 * height / width`` rows."""
    rows = np.zeros((height, width), np.uint8)
    rows[:, : max(1, width // 2)] = 200
    return _encode(Image.fromarray(rows), "PNG", optimize=False)


def apng_frames(frames: int, side: int = 2500) -> bytes:
    """An APNG of ``frames`` frames on a ``side``x``side`` canvas, each frame after the first a
    1x1 patch: tiny on disk, but every frame is composed on the whole canvas."""
    raw = b"".join([b"\x00" + bytes(side)] * side)
    idat = zlib.compress(raw, 9)
    out = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)),
    ]
    out.append(_chunk(b"acTL", struct.pack(">II", frames, 0)))
    seq = 0

    def fctl(width: int, height: int) -> bytes:
        nonlocal seq
        seq += 1
        return _chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq - 1, width, height, 0, 0, 1, 10, 0, 0))

    out += [fctl(side, side), _chunk(b"IDAT", idat)]
    patch = zlib.compress(b"\x00\xff", 9)
    for _ in range(frames - 1):
        out.append(fctl(1, 1))
        out.append(_chunk(b"fdAT", struct.pack(">I", seq) + patch))
        seq += 1
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


# --- GIF -----------------------------------------------------------------------------------

_GIF_PIXEL = b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2, one sub-block: one pixel


def _gif_head(width: int, height: int) -> bytes:
    # A global colour table of two entries.
    return (
        b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    )


def _gif_frame(left: int, top: int, width: int = 1, height: int = 1) -> bytes:
    control = b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms, no disposal
    return control + b"\x2c" + struct.pack("<HHHHB", left, top, width, height, 0) + _GIF_PIXEL


def gif_frames(frames: int, side: int = 2500) -> bytes:
    """A GIF of ``frames`` 1x1 frames on a ``side``x``side`` canvas."""
    body = b"".join(_gif_frame(i % side, 0) for i in range(frames))
    return _gif_head(side, side) + body + b"\x3b"


def gif_growing_canvas(frames: int = 8) -> bytes:
    """A 1x1 GIF whose later frames sit at offsets near 65535, growing the canvas."""
    body = _gif_frame(0, 0) + b"".join(_gif_frame(65534 - i, 65534 - i) for i in range(1, frames))
    return _gif_head(1, 1) + body + b"\x3b"


def gif_extensions(count: int) -> bytes:
    """A 1x1 GIF with ``count`` empty comment extensions before its frame."""
    return _gif_head(1, 1) + b"\x21\xfe\x00" * count + _gif_frame(0, 0) + b"\x3b"


# --- WebP ----------------------------------------------------------------------------------


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload)) + payload + pad


def _u24(value: int) -> bytes:
    return struct.pack("<I", value)[:3]


def webp_frames(frames: int, side: int = 2500) -> bytes:
    """An animated WebP of ``frames`` 1x1 lossless frames on a ``side``x``side`` canvas."""
    still = _encode(Image.new("RGBA", (1, 1), (200, 10, 10, 255)), "WEBP", lossless=True)
    pos = still.index(b"VP8L")
    size = struct.unpack_from("<I", still, pos + 4)[0]
    bitstream = _riff_chunk(b"VP8L", still[pos + 8 : pos + 8 + size])
    vp8x = _riff_chunk(b"VP8X", bytes([0x12, 0, 0, 0]) + _u24(side - 1) + _u24(side - 1))
    anim = _riff_chunk(b"ANIM", b"\x00\x00\x00\x00\x00\x00")
    frame = _u24(0) + _u24(0) + _u24(0) + _u24(0) + _u24(10) + b"\x00" + bitstream
    body = vp8x + anim + _riff_chunk(b"ANMF", frame) * frames
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


# --- TIFF ----------------------------------------------------------------------------------


def _ifd(entries: list[tuple[int, int, int, int]], next_offset: int) -> bytes:
    """A little-endian IFD: (tag, type, count, value-or-offset) entries, sorted by tag."""
    body = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        if kind == 3 and count == 1:
            body += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            body += struct.pack("<HHII", tag, kind, count, value)
    return body + struct.pack("<I", next_offset)


def _page(width: int, height: int, strip_offset: int) -> list[tuple[int, int, int, int]]:
    return [
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, strip_offset),
        (278, 3, 1, height),
        (279, 4, 1, width * height),
    ]


def tiff_pages(pages: int) -> bytes:
    """A greyscale TIFF of ``pages`` 1x1 pages, all sharing one strip."""
    entry_size = len(_ifd(_page(1, 1, 0), 0))
    strip = 8
    first = 10  # past the header and the strip (padded to even)
    out = [b"II*\x00" + struct.pack("<I", first) + b"\x80\x00"]
    for i in range(pages):
        nxt = first + (i + 1) * entry_size if i + 1 < pages else 0
        out.append(_ifd(_page(1, 1, strip), nxt))
    return b"".join(out)


def tiff_ifd_loop() -> bytes:
    """A one-page TIFF whose IFD names itself as the next one."""
    return b"II*\x00" + struct.pack("<I", 10) + b"\x80\x00" + _ifd(_page(1, 1, 8), 10)


def tiff_strips(strips: int, side: int = 16) -> bytes:
    """A ``side``x``side`` TIFF declaring ``strips`` strips (SHORT offsets and byte counts, all
    naming one row of pixels)."""
    data_at = 8
    offsets_at = data_at + side + (side % 2)
    counts_at = offsets_at + 2 * strips
    ifd_at = counts_at + 2 * strips
    entries = [
        (256, 3, 1, side),
        (257, 3, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 3, strips, offsets_at),
        (278, 3, 1, 1),
        (279, 3, strips, counts_at),
    ]
    pixels = bytes(i % 256 for i in range(side)) + b"\x00" * (side % 2)
    offsets = struct.pack(f"<{strips}H", *([data_at] * strips))
    counts = struct.pack(f"<{strips}H", *([side] * strips))
    header = b"II*\x00" + struct.pack("<I", ifd_at)
    return header + pixels + offsets + counts + _ifd(entries, 0)


def tiff_huge_tile(side: int = 16, tile: int = 65520, compression: int = 8) -> bytes:
    """A ``side``x``side`` TIFF stored as one ``tile``x``tile`` tile (deflate by default: a
    decoder that sizes its buffer from the tile allocates ``tile**2`` bytes)."""
    raw = bytes(side * side)
    payload = zlib.compress(raw) if compression == 8 else raw
    data_at = 8
    ifd_at = data_at + len(payload) + (len(payload) % 2)
    entries = [
        (256, 3, 1, side),
        (257, 3, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, compression),
        (262, 3, 1, 1),
        (322, 3, 1, tile),
        (323, 3, 1, tile),
        (324, 4, 1, data_at),
        (325, 4, 1, len(payload)),
    ]
    pad = b"\x00" * (len(payload) % 2)
    return b"II*\x00" + struct.pack("<I", ifd_at) + payload + pad + _ifd(entries, 0)


# --- BMP -----------------------------------------------------------------------------------


def bmp_rle_commands(commands: int, width: int = 1, height: int = 2) -> bytes:
    """An 8-bit RLE BMP whose pixel data is ``commands`` one-pixel runs on one row: the
    decoder clips all but the first to the row (the second row never comes) and walks
    every one."""
    palette = b"\x00\x00\x00\x00\xff\xff\xff\x00"
    pixels = b"\x01\x01" * commands + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 2, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


#: the worst instance of each class, by name (each a few MB at most)
HOSTILE: dict[str, Callable[[], bytes]] = {
    "jpeg_50k_scans": lambda: jpeg_progressive(50_000),
    "jpeg_1m_segments": lambda: jpeg_segments(1_000_000),
    "png_300k_chunks": lambda: png_chunks(300_000),
    "png_300k_chunks_after_idat": lambda: png_chunks(300_000, after_data=True),
    "apng_1000_frames": lambda: apng_frames(1000),
    "gif_1000_frames": lambda: gif_frames(1000),
    "gif_growing_canvas": gif_growing_canvas,
    "gif_1m_extensions": lambda: gif_extensions(1_000_000),
    "webp_1000_frames": lambda: webp_frames(1000),
    "tiff_40k_pages": lambda: tiff_pages(40_000),
    "tiff_ifd_loop": tiff_ifd_loop,
    "tiff_1m_strips": lambda: tiff_strips(1_000_000),
    "tiff_huge_tile": tiff_huge_tile,
    "bmp_rle_2m_commands": lambda: bmp_rle_commands(2_000_000),
    "png_1x100000": lambda: png_strip(1, 100_000),
    "png_100000x1": lambda: png_strip(100_000, 1),
}


#: the dearest input each class may still be at the default caps: the budget must hold for
#: these classified (or refused by Pillow), not only for the refused ones above
AT_CAPS: dict[str, Callable[[], bytes]] = {
    "jpeg_100_scans_50mpx": lambda: jpeg_progressive(99, 7064),  # and the DC scan
    "jpeg_100k_segments": lambda: jpeg_segments(99_990),
    "png_100k_chunks": lambda: png_chunks(99_990),
    "apng_500m_walk": lambda: apng_frames(80),
    "gif_500m_walk": lambda: gif_frames(80),
    "gif_1000_frames_500m_walk": lambda: gif_frames(1000, 707),
    "webp_500m_walk": lambda: webp_frames(80),
    "tiff_1000_pages": lambda: tiff_pages(1000),
    "gif_100k_extensions": lambda: gif_extensions(99_990),
    "bmp_rle_100k_commands": lambda: bmp_rle_commands(99_990),
    "png_1x100": lambda: png_strip(1, 100),
    "png_70000x700": lambda: png_strip(70_000, 700),
}
