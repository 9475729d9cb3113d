"""How much the scan pipeline adds on top of the work it must do.

For each preset, in one run over the same set of mixed-size JPEGs:

- scan:  the modq pipeline (thread pool, dynamic batcher, cache off so every image is a miss),
         built exactly as `modq scan` builds it, with the model already loaded;
- bare:  the model alone, `Backend.forward` on preloaded arrays, at the same batch size;
- floor: the same per-image work as scan (read, sha256, draft decode, perceptual hashes,
         preprocess, batched forward) done sequentially in one thread, no pipeline machinery.

It prints images per second for each and the ratios scan/floor (target >= 0.9: the pipeline
must add almost nothing) and scan/bare, and the CPU time per image of scan over the floor's
(this process, the two runs back to back). With ``--backstop`` it also runs scan with the decode
backstop (a pool of decoder processes, one per core, as `modq scan` and the worker decode by
default) and with decoding in-process (MODQ_DECODE_PROCESSES=0), in ``--rounds`` pairs whose
order alternates, and prints both and the median of the pairs' ratios, in images per second
and in CPU time per image (this process and its decoder processes). Hub presets run on
random-weight look-alikes (same architecture and preprocessing, so the same speed) built once
into bench/out/lookalikes.

    .venv/bin/python bench/scan.py [--presets opennsfw,marqo] [--images 200] [--batch 32]
                                   [--backstop [--rounds 3]]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from worker.decode import DecodeLimits, decode
from worker.decode.pool import Backstop, DecodePool
from worker.decode.prepare import Prepared, Recipe, decode_prepared
from worker.decode.proc import cpu_seconds
from worker.hashing import hash_image
from worker.models.backend import Backend
from worker.models.precision import load_model
from worker.models.preprocess import draft_size
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.storage import LocalStore, file_ref

OUT = Path(__file__).resolve().parent / "out"


def photo_like(seed: int, width: int, height: int) -> Image.Image:
    """Smooth gradients, shapes and mild noise: compresses and resizes like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(width // 10 + 1, width // 3 + 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(max(1, width // 400)))
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_images(count: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"img-{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        bucket = i % 10
        if bucket < 6:
            long_side = int(rng.integers(320, 1024))
        elif bucket < 9:
            long_side = int(rng.integers(1024, 2048))
        else:
            long_side = int(rng.integers(3000, 4001))
        aspect = float(rng.uniform(0.6, 1.0))
        size = (long_side, max(32, int(long_side * aspect)))
        if i % 2:
            size = size[::-1]
        photo_like(i, *size).save(path, "JPEG", quality=88)
    return paths


def lookalike(preset: str) -> str:
    if preset == "opennsfw":
        return preset
    from worker.models.lookalike import build_lookalike

    folder = OUT / "lookalikes" / preset
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        print(f"building the {preset} look-alike in {folder.relative_to(OUT.parent.parent)} …")
        build_lookalike(preset, folder)
    return str(folder)


def floor(backend: Backend, paths: list[Path], batch: int, limits: DecodeLimits) -> float:
    """The tight loop: the same per-image work, one thread, no pipeline."""
    draft = draft_size(backend.card)
    started = time.perf_counter()
    pending: list[np.ndarray] = []
    for path in paths:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        decoded = decode(data, limits, draft)
        hash_image(data, decoded.frames[0], sha)
        pending.extend(backend.preprocess(frame) for frame in decoded.frames)
        if len(pending) >= batch:
            backend.forward(np.stack(pending[:batch]))
            pending = pending[batch:]
    if pending:
        backend.forward(np.stack(pending))
    return len(paths) / (time.perf_counter() - started)


def scan(
    backend: Backend,
    paths: list[Path],
    batch: int,
    limits: DecodeLimits,
    decoder: Callable[[bytes, DecodeLimits, int | None, Recipe], Prepared] = decode_prepared,
) -> float:
    """The pipeline as `modq scan` builds it (see worker/scan.py: run_scan), model preloaded."""
    options = PipelineOptions(
        limits=limits, max_batch_size=batch, max_wait_ms=10.0, decoder=decoder
    )
    store = LocalStore([paths[0].parent])
    concurrency = max(4, min(2 * batch, batch + 2 * (os.cpu_count() or 1)))  # as run_scan
    with Pipeline(backend, store, Policy("bench", 0.5, 0.9), options=options) as pipeline:
        started = time.perf_counter()
        results = list(pipeline.process_many(map(file_ref, paths), concurrency))
        elapsed = time.perf_counter() - started
    errors = [r for r in results if r.error]
    if errors:
        raise SystemExit(f"scan produced {len(errors)} errors, e.g. {errors[0].error}")
    return len(paths) / elapsed


def bare(backend: Backend, paths: list[Path], batch: int, limits: DecodeLimits) -> float:
    arrays = [
        backend.preprocess(decode(p.read_bytes(), limits, draft_size(backend.card)).frames[0])
        for p in paths[:batch]
    ]
    stacked = np.stack(arrays)
    backend.forward(stacked)
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < 2.0:
        backend.forward(stacked)
        runs += 1
    return runs * len(arrays) / (time.perf_counter() - started)


def backstop(
    backend: Backend,
    paths: list[Path],
    batch: int,
    limits: DecodeLimits,
    preset: str,
    rounds: int,
) -> None:
    """Scan with the decode pool and in-process, in pairs whose order alternates; the median
    of the pairs' ratios (a shared machine's load drifts between passes)."""
    processes = len(os.sched_getaffinity(0))
    pooled, inproc, ratios, cpu_ratios = [], [], [], []
    with DecodePool(Backstop(processes)) as pool:
        scan(backend, paths[:batch], batch, limits, pool.prepare)  # warm the decoders
        for i in range(rounds):
            pair, cpu = {}, {}
            for mode in ("pool", "in-process")[:: 1 if i % 2 else -1]:
                decoder = pool.prepare if mode == "pool" else decode_prepared
                started = _cpu_seconds(pool)
                pair[mode] = scan(backend, paths, batch, limits, decoder)
                cpu[mode] = _cpu_seconds(pool) - started
            pooled.append(pair["pool"])
            inproc.append(pair["in-process"])
            ratios.append(pair["pool"] / pair["in-process"])
            cpu_ratios.append(cpu["pool"] / cpu["in-process"])
    print(
        f"{preset:10} backstop ({processes} decoder processes), {rounds} rounds: pool "
        f"{statistics.median(pooled):.1f} img/s, in-process {statistics.median(inproc):.1f} "
        f"img/s (medians); pool/in-process {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); CPU per image, pool (this "
        f"process and its decoders) / in-process {statistics.median(cpu_ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in cpu_ratios)})",
        flush=True,
    )


def _cpu_seconds(pool: DecodePool) -> float:
    """CPU time of this process and of the pool's decoder processes (user + system)."""
    total = time.process_time()
    for pid in pool.pids():
        seconds = cpu_seconds(pid)
        total += seconds or 0.0
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="opennsfw,marqo")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--backstop", action="store_true", help="also compare the decode pool with in-process"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--backstop: pairs of scans")
    args = parser.parse_args()

    import onnxruntime
    import torch

    print(
        f"# {platform.machine()} cores={os.cpu_count()} torch={torch.__version__} "
        f"onnxruntime={onnxruntime.__version__}"
    )
    paths = make_images(args.images, OUT / "scan-images")
    limits = DecodeLimits()
    print(f"# {len(paths)} JPEGs, 320-4000 px; batch {args.batch}; fp32; cache off\n")
    header = f"{'preset':10} {'scan img/s':>11} {'floor img/s':>12} {'bare img/s':>11}"
    print(header + f" {'scan/floor':>11} {'scan/bare':>10} {'CPU/image scan/floor':>21}")
    for preset in args.presets.split(","):
        backend = load_model(lookalike(preset), device="cpu", precision="fp32")
        # Warm caches and allocators with a short pass of each, then measure.
        floor(backend, paths[: args.batch], args.batch, limits)
        scan(backend, paths[: args.batch], args.batch, limits)
        started = time.process_time()
        floor_ips = floor(backend, paths, args.batch, limits)
        floor_cpu = time.process_time() - started
        started = time.process_time()
        scan_ips = scan(backend, paths, args.batch, limits)
        scan_cpu = time.process_time() - started
        bare_ips = bare(backend, paths, args.batch, limits)
        print(
            f"{preset:10} {scan_ips:11.1f} {floor_ips:12.1f} {bare_ips:11.1f} "
            f"{scan_ips / floor_ips:11.2f} {scan_ips / bare_ips:10.2f} "
            f"{scan_cpu / floor_cpu:21.2f}",
            flush=True,
        )
        if args.backstop:
            backstop(backend, paths, args.batch, limits, preset, args.rounds)
    print("\ntarget: scan/floor >= 0.9 for every preset")


if __name__ == "__main__":
    main()
