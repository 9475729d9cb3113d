"""How long `modq finetune --mode head` takes on a real-size model, and where the time goes.

Builds (once, into bench/out/finetune-images/) 1,000 photo-like JPEGs in two classes, a warm
and a cool colour cast over the same kind of scene, and for each preset runs head-mode
fine-tuning twice:

- cold: embeddings extracted (read, decode, preprocess, forward) into a fresh disk cache;
- warm: the same run again, every embedding read back from that cache;

and prints the wall time split into embedding extraction and head training, and images/s.

Hub presets run on random-weight look-alikes (same architecture, input size and
preprocessing, so the same speed) built once into bench/out/lookalikes/.

    .venv/bin/python bench/finetune.py [--presets opennsfw,marqo] [--images 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scan import OUT, lookalike, photo_like  # bench/scan.py, beside this script

from worker.finetune import FinetuneOptions, FinetuneResult, finetune

CLASSES = ("nsfw", "safe")  # warm, cool


def make_dataset(count: int, folder: Path) -> Path:
    """``count`` JPEGs split evenly over the classes, 480-800 px on the long side."""
    rng = np.random.default_rng(7)
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        path = folder / label / f"img-{i:04d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        long_side = int(rng.integers(480, 801))
        size = (long_side, int(long_side * rng.uniform(0.6, 0.8)))
        pixels = np.asarray(photo_like(10_000 + i, *size), dtype=np.float32) * 0.75
        pixels[..., 0 if label == "nsfw" else 2] += 60.0
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path, "JPEG", quality=88)
    return folder


def run(spec: str, data: Path, work: Path, cache: Path, name: str) -> tuple[FinetuneResult, float]:
    options = FinetuneOptions(model=spec, device="cpu", embedding_cache=cache, force=True)
    started = time.perf_counter()
    result = finetune(data, work / name, options)
    return result, time.perf_counter() - started


def report(preset: str, kind: str, result: FinetuneResult, wall: float) -> None:
    best = result.history.best
    per_second = result.images / result.extract_seconds
    print(
        f"{preset:9} {kind:5} {result.images:6d} {result.from_cache:6d} "
        f"{result.extract_seconds:9.1f} {per_second:8.1f} {result.train_seconds:8.2f} "
        f"{len(result.history.epochs) - 1:6d} {wall:8.1f} {best.val_accuracy:7.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="opennsfw,marqo")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()

    import onnxruntime
    import torch

    print(
        f"# {platform.machine()} cores={os.cpu_count()} torch={torch.__version__} "
        f"onnxruntime={onnxruntime.__version__}"
    )
    data = make_dataset(args.images, OUT / "finetune-images" / str(args.images))
    print(f"# {args.images} JPEGs in {len(CLASSES)} classes; head mode, fp32, defaults\n")
    print(
        f"{'preset':9} {'run':5} {'images':>6} {'cached':>6} {'extract s':>9} {'img/s':>8} "
        f"{'train s':>8} {'epochs':>6} {'wall s':>8} {'val acc':>7}"
    )
    work = Path(tempfile.mkdtemp(prefix="modq-finetune-bench-"))
    try:
        for preset in args.presets.split(","):
            spec = lookalike(preset)
            cache = work / f"{preset}-embeddings.sqlite3"
            for kind in ("cold", "warm"):
                result, wall = run(spec, data, work, cache, preset)
                report(preset, kind, result, wall)
    finally:
        shutil.rmtree(work)
    print("\nwall s = the whole run: model load, extraction, training, writing the model")


if __name__ == "__main__":
    main()
