"""Model speed per preset, runtime and precision, and the score drift each choice causes.

For each preset (hub presets as random-weight look-alikes: same architecture, same speed):

- images/second of `Backend.forward` on preloaded, preprocessed arrays at batch 1, 8 and 32,
  for torch fp32, torch bf16 and ONNX Runtime fp32 (the model exported by modq), with the
  largest |p - p_fp32| of each on the same batch;
- the draft-decode trade: decode + preprocess time per large JPEG with and without draft
  mode, and the largest |nsfw_score(draft) - nsfw_score(exact)| over those images.

    .venv/bin/python bench/models.py [--presets opennsfw,marqo,...] [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from collections.abc import Callable

import numpy as np
from scan import OUT, lookalike, photo_like  # bench/scan.py, beside this script

from worker.decode import DecodeLimits, decode
from worker.models.backend import Backend
from worker.models.factory import create_backend
from worker.models.preprocess import draft_size

ALL = ("opennsfw", "marqo", "falconsai", "freepik", "adamcodd")
MAX_SECONDS_PER_BATCH = 15.0


def per_second(fn: Callable[[], object], items: int, min_seconds: float) -> tuple[float, float]:
    """Warm up once, then repeat until ``min_seconds`` have passed; (items/s, s per call)."""
    started = time.perf_counter()
    fn()
    first = time.perf_counter() - started
    runs, started = 0, time.perf_counter()
    while runs < 1 or time.perf_counter() - started < min_seconds:
        fn()
        runs += 1
    seconds = (time.perf_counter() - started) / runs
    return items / seconds, max(first, seconds)


def variants(spec: str) -> list[tuple[str, Backend]]:
    base = create_backend(spec, device="cpu", precision="fp32")
    if base.card.runtime == "onnx":
        return [("onnx fp32", base)]
    from worker.models.export import export_onnx
    from worker.models.precision import export_path
    from worker.models.torch_backend import TorchBackend

    assert isinstance(base, TorchBackend)
    found: list[tuple[str, Backend]] = [
        ("torch fp32", base),
        ("torch bf16", base.with_precision("bf16")),
    ]
    exported = export_path(OUT / "onnx", base.card)
    if not exported.is_file():
        export_onnx(base, exported)
    found.append(("onnx fp32", create_backend(str(exported))))
    return found


def speed_table(preset: str, spec: str, quick: bool) -> None:
    backends = variants(spec)
    reference = backends[0][1]
    images = [photo_like(100 + i, 640, 480) for i in range(32)]
    arrays = np.stack([reference.preprocess(image) for image in images])
    fp32 = reference.forward(arrays).probabilities
    for name, backend in backends:
        drift = float(np.abs(backend.forward(arrays[:8]).probabilities - fp32[:8]).max())
        cells, last_seconds, last_batch = [], 0.0, 1
        for batch in (1, 8, 32):
            estimate = last_seconds * batch / last_batch
            if (quick and batch == 32) or estimate > MAX_SECONDS_PER_BATCH:
                cells.append("skipped")
                continue
            rate, last_seconds = per_second(
                lambda run=backend, b=batch: run.forward(arrays[:b]), batch, 0.5 if quick else 1.5
            )
            last_batch = batch
            cells.append(f"{rate:.1f}")
        print(f"{preset:10} {name:11} " + " ".join(f"{c:>9}" for c in cells) + f" {drift:>10.2e}")


def draft_table(preset: str, spec: str, count: int) -> None:
    backend = create_backend(spec, device="cpu", precision="fp32")
    limits = DecodeLimits()
    datas = []
    for i in range(count):
        buffer = io.BytesIO()
        photo_like(500 + i, 4000 if i % 2 else 3000, 3000 if i % 2 else 4000).save(
            buffer, "JPEG", quality=90
        )
        datas.append(buffer.getvalue())
    timings: dict[bool, float] = {}
    scores: dict[bool, list[float]] = {}
    for exact in (True, False):
        draft = None if exact else draft_size(backend.card)
        started = time.perf_counter()
        arrays = [backend.preprocess(decode(d, limits, draft).frames[0]) for d in datas]
        timings[exact] = (time.perf_counter() - started) / len(datas) * 1000
        outputs = backend.forward(np.stack(arrays))
        scores[exact] = [
            backend.postprocess(outputs, i).scores.nsfw_score for i in range(len(datas))
        ]
    drift = max(abs(a - b) for a, b in zip(scores[True], scores[False], strict=True))
    print(
        f"{preset:10} {timings[True]:14.1f} {timings[False]:14.1f} "
        f"{timings[True] / timings[False]:8.1f}x {drift:12.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(ALL))
    parser.add_argument("--quick", action="store_true", help="shorter timings, no batch 32")
    parser.add_argument("--draft-images", type=int, default=20)
    args = parser.parse_args()
    import onnxruntime
    import torch

    print(
        f"# {platform.machine()} cores={os.cpu_count()} torch={torch.__version__} "
        f"onnxruntime={onnxruntime.__version__}; hub presets are random-weight look-alikes\n"
    )
    presets = args.presets.split(",")
    specs = {preset: lookalike(preset) for preset in presets}
    print("images/second of the forward pass on preloaded arrays; drift = max |p - p_torch_fp32|")
    columns = ("batch 1", "batch 8", "batch 32", "drift")
    print(f"{'preset':10} {'runtime':11} " + " ".join(f"{c:>9}" for c in columns))
    for preset in presets:
        speed_table(preset, specs[preset], args.quick)
    print(f"\ndecode + preprocess per {args.draft_images} photo-like 4000x3000 JPEGs")
    print(
        f"{'preset':10} {'exact ms/img':>14} {'draft ms/img':>14} {'speedup':>9} "
        f"{'score drift':>12}"
    )
    for preset in presets:
        draft_table(preset, specs[preset], args.draft_images)


if __name__ == "__main__":
    main()
