"""Distinct test JPEGs for the queue tests, and the scores the bundled model gives them
in-process (what a worker must reproduce)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.corpus import EXAMPLES

__all__ = ["distinct_images", "reference_scores"]


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
