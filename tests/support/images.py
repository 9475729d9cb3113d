"""Distinct test JPEGs for the queue tests, and the scores the bundled model gives them
in-process (what a worker must reproduce)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tests.support.corpus import EXAMPLES

__all__ = [
    "distinct_images",
    "flat",
    "noise_jpeg",
    "recompressed",
    "reference_scores",
    "textured",
]


def noise_jpeg(seed: int) -> bytes:
    """A small JPEG of random pixels: a distinct, valid upload for delivery tests."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def distinct_images(count: int, seed: int, size: int = 224) -> list[bytes]:
    """``count`` different JPEGs: crops of the example photos at varied places and sizes."""
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 3, min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize((size + 8 * (i % 8),) * 2)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def reference_scores(contents: list[bytes]) -> dict[str, float]:
    """open_nsfw scores of each content in-process, by sha256."""
    from worker.models.precision import load_model
    from worker.pipeline import Pipeline, PipelineOptions
    from worker.policy import Policy
    from worker.storage import MemoryStore

    backend = load_model("opennsfw", "cpu", "fp32", 0, Path("/nonexistent"))
    store = MemoryStore({f"mem://{i}": data for i, data in enumerate(contents)})
    never = Policy("never", 1.0, 1.0)
    with Pipeline(backend, store, never, options=PipelineOptions(max_wait_ms=2)) as pipeline:
        results = {i: pipeline.process(f"mem://{i}") for i in range(len(contents))}
    return {
        hashlib.sha256(contents[i]).hexdigest(): float(r.nsfw_score or 0.0)
        for i, r in results.items()
    }


def textured(seed: int, size: int = 128) -> Image.Image:
    """Smooth colour noise with a few ellipses: enough structure for PDQ quality 100."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def recompressed(image: Image.Image) -> Image.Image:
    """The same picture as a re-upload often is: half the size, JPEG quality 60."""
    buffer = io.BytesIO()
    image.resize((image.width // 2, image.height // 2)).save(buffer, "JPEG", quality=60)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def flat(size: int = 128) -> Image.Image:
    return Image.new("RGB", (size, size), (120, 30, 200))
