"""Deterministic test images: a varied corpus built from the example photos, and hostile bytes."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


def _photos() -> list[Image.Image]:
    colour, grey = [], []
    for path in sorted(EXAMPLES.glob("*.jpg")):
        with Image.open(path) as image:
            (grey if image.mode == "L" else colour).append(image.convert("RGB"))
    photos = colour + grey  # the variants below are made from colour photos
    if len(colour) < 4:
        raise RuntimeError(f"expected the example photos in {EXAMPLES}")
    return photos


def _with_orientation(image: Image.Image, orientation: int, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, exif=exif)


def build_corpus(out_dir: Path) -> list[Path]:
    """Write the corpus into ``out_dir`` and return the files, sorted by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    rng = np.random.default_rng(7)
    a, b, c, d = photos[0], photos[1], photos[2], photos[3]

    def put(name: str, image: Image.Image, fmt: str, **kwargs: object) -> None:
        image.save(out_dir / name, fmt, **kwargs)

    for i, photo in enumerate(photos):
        put(f"photo-{i}.jpg", photo, "JPEG", quality=90)
    drawing = Image.new("RGB", (640, 480), (250, 245, 230))
    draw = ImageDraw.Draw(drawing)
    for _ in range(25):
        x, y = (int(v) for v in rng.integers(0, 600, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((x, y, x + 80, y + 60), fill=colour, outline=(0, 0, 0))
        draw.ellipse((y, x % 440, y + 40, x % 440 + 40), fill=colour[::-1])
    put("drawing.png", drawing, "PNG")
    put("grey.jpg", b.convert("L"), "JPEG", quality=90)
    rgba = c.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgba.size)
    rgba.putalpha(alpha)
    put("rgba.png", rgba, "PNG")
    put("palette.png", d.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")
    put("cmyk.jpg", a.convert("CMYK"), "JPEG", quality=90)
    grey16 = (np.asarray(b.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(out_dir / "grey16.png", "PNG")
    _with_orientation(c, 6, out_dir / "exif-rotated-6.jpg")
    _with_orientation(d, 3, out_dir / "exif-rotated-3.jpg")
    put("tiny-8x8.png", a.resize((8, 8)), "PNG")
    put("tiny-1x1.png", a.resize((1, 1)), "PNG")
    put("wide-2000x60.jpg", b.resize((2000, 60)), "JPEG", quality=90)
    put("tall-60x1500.jpg", c.resize((60, 1500)), "JPEG", quality=90)
    put("photo.webp", d, "WEBP", quality=85)
    put("still.gif", a.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    frames = [p.resize((160, 120)).convert("P", palette=Image.Palette.ADAPTIVE) for p in photos[:5]]
    frames[0].save(
        out_dir / "animated.gif",
        "GIF",
        save_all=True,
        append_images=frames[1:],
        duration=80,
        loop=0,
    )
    put("photo.bmp", c.resize((320, 240)), "BMP")
    put("photo.tiff", d.resize((320, 240)), "TIFF")
    large = a.resize((4000, 3000), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    put("large-4000x3000.jpg", large, "JPEG", quality=85)
    put("progressive.jpg", b, "JPEG", quality=85, progressive=True)
    return sorted(out_dir.iterdir())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def gif_blocks(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split a GIF into its head (header, screen descriptor, global palette) and its blocks."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    head, blocks = data[:pos], []
    while data[pos] != 0x3B:
        start = pos
        if data[pos] == 0x21:  # extension: introducer, label, sub-blocks
            pos += 2
        else:  # image descriptor, local palette, LZW code size, sub-blocks
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        while data[pos]:
            pos += data[pos] + 1
        blocks.append(data[start : pos + 1])
        pos += 1
    return head, blocks


def _many_frames_gif(count: int) -> bytes:
    """A 2x2 GIF of ``count`` frames, alternately black and white.

    Pillow's ``save_all`` would write a 768-byte palette into every frame (8 MB and a second
    to build for 10,000 frames); repeating the two frames Pillow encodes for a two-frame
    file keeps it at 33 bytes a frame and builds in milliseconds."""
    frames = []
    for level in (0, 1):
        frame = Image.new("P", (2, 2), level)
        frame.putpalette([0, 0, 0, 255, 255, 255])
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=[20, 30])
    head, blocks = gif_blocks(buffer.getvalue())
    # Each frame is its graphic control extension (delay) plus its image descriptor and data.
    pair = [block for block in blocks if block[:2] == b"\x21\xf9" or block[0] == 0x2C]
    if len(pair) != 4:
        raise RuntimeError(f"unexpected GIF layout from Pillow: {[b[:2] for b in blocks]}")
    body = b"".join(pair) * (count // 2) + b"".join(pair[:2]) * (count % 2)
    return head + body + b"\x3b"


def hostile_samples() -> dict[str, bytes]:
    photo = _photos()[0]
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    png = io.BytesIO()
    photo.save(png, "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("payload.txt", "not an image")
    noise = random.Random(3).randbytes(4096)
    return {
        "empty": b"",
        "random": noise,
        "truncated_jpeg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated_png": png.getvalue()[: len(png.getvalue()) // 2],
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<rect width="10" height="10" fill="red"/></svg>',
        "png_bomb": _png_bomb(),
        "gif_many_frames": _many_frames_gif(10_000),
        "polyglot": jpeg.getvalue() + archive.getvalue(),
        "text_as_jpg": b"this is plain text, saved with a .jpg name\n" * 20,
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in build_corpus(Path(tmp)):
            with Image.open(path) as image:
                print(f"{path.name:24} {image.format:5} {image.mode:6} {image.size}")
        for name, data in hostile_samples().items():
            print(f"{name:24} {len(data)} bytes")
