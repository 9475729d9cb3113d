"""Model throughput per preset, precision and runtime, and the draft-decode drift.

    .venv/bin/python bench/models.py            # every preset (~4-5 min on 2 cores)
    .venv/bin/python bench/models.py --quick    # shorter cells, no batch 32 for the EVA02/ViT-384
    .venv/bin/python bench/models.py --presets opennsfw,marqo

Table 1 times ``Backend.forward`` alone on preloaded, preprocessed arrays (no decode, no
preprocessing) at batch 1, 8 and 32, for torch fp32, torch bf16 and ONNX Runtime fp32 (an
export of the torch model, made once). "max |p - p_fp32|" is the largest difference of any
label probability of any image of the same batch, against torch fp32.

Table 2 decodes ~20 large photo-like JPEGs exactly and in JPEG draft mode (the size the
pipeline uses), preprocesses both and compares the resulting nsfw_score.

The hub presets run random-weight look-alikes (same architecture, config and files as the real
repositories; built once into bench/out/lookalikes): speeds are real, scores mean nothing, so
their drift figures show numerical sensitivity, not accuracy. opennsfw runs its real bundled
weights.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # must set up the hub cache before the worker imports huggingface_hub

HEAVY = ("freepik", "adamcodd")  # EVA02-B @448 and ViT-B @384: >100 GFLOP per image


@dataclass
class Row:
    preset: str
    runtime: str
    cells: dict[int, str] = field(default_factory=dict)
    rates: dict[int, float] = field(default_factory=dict)
    drift: float | None = None
    note: str = ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets",
        default=",".join(c.ALL_PRESETS),
        help="comma-separated presets (default: all five)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="0.5 s per cell, 8 drift images, no batch 32 for freepik/adamcodd",
    )
    parser.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="timed seconds per cell after the warm-up (default 1, quick 0.5)",
    )
    parser.add_argument(
        "--max-batch-seconds",
        type=float,
        default=20.0,
        help="skip a cell whose single batch is estimated to take longer (default 20)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="large JPEGs for the draft-decode drift (default 20, quick 8)",
    )
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-decode table")
    parser.add_argument("--no-bf16", action="store_true", help="skip torch bf16")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0 = all)")
    parser.add_argument(
        "--lookalikes",
        type=Path,
        default=c.DEFAULT_LOOKALIKES,
        help="look-alike cache folder (default bench/out/lookalikes)",
    )
    parser.add_argument(
        "--onnx-dir",
        type=Path,
        default=c.OUT / "onnx",
        help="ONNX export folder (default bench/out/onnx)",
    )
    args = parser.parse_args()
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in args.presets if p not in c.ALL_PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {', '.join(c.ALL_PRESETS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.min_seconds is None:
        args.min_seconds = 0.5 if args.quick else 1.0
    if args.images is None:
        args.images = 8 if args.quick else 20
    return args


def probe_arrays(backend: Any, count: int) -> Any:
    """``count`` distinct preprocessed photo-like images (mixed aspect ratios), stacked."""
    import numpy as np

    shapes = [(640, 480), (480, 640), (800, 450), (512, 512)]
    return np.stack(
        [
            backend.preprocess(c.photo_like(10_000 + i, *shapes[i % len(shapes)]))
            for i in range(count)
        ]
    )


def bench_runtime(
    backend: Any,
    arrays: Any,
    args: argparse.Namespace,
    preset: str,
    reference: dict[int, Any] | None,
    log: Any,
) -> tuple[dict[int, str], dict[int, float], float | None, dict[int, Any]]:
    """Time ``backend.forward`` per batch size: the printed cells, images/second, the drift
    against ``reference`` and the probabilities of each batch (to serve as a reference)."""
    import numpy as np

    cells: dict[int, str] = {}
    rates: dict[int, float] = {}
    probabilities: dict[int, Any] = {}
    per_image: float | None = None  # seconds per image at the largest batch measured so far
    drift: float | None = None
    for batch in args.batches:
        if args.quick and preset in HEAVY and batch >= 32:
            cells[batch] = "skipped (--quick)"
            continue
        if per_image is not None and per_image * batch > args.max_batch_seconds:
            cells[batch] = f"skipped (~{per_image * batch:.0f} s/batch)"
            continue
        x = arrays[:batch]
        out: list[Any] = []

        def call(x: Any = x, out: list[Any] = out) -> None:
            out.append(backend.forward(x).probabilities)

        # A batch estimated at over 3 s gets no warm-up of its own: the smaller batch already
        # warmed the weights and allocators, and a first call costs little next to 3 s.
        warm = 0 if per_image is not None and per_image * batch > 3.0 else 1
        timed = c.time_call(call, args.min_seconds, warmup=warm)
        per_image = timed.seconds_per_call / batch
        rates[batch] = 1.0 / per_image
        cells[batch] = c.fmt_rate(1.0 / per_image)
        probabilities[batch] = out[-1]
        log(
            f"  {preset} {backend.card.runtime}/{backend.precision} b{batch}: "
            f"{1 / per_image:.2f} img/s ({timed.calls} timed calls)"
        )
        if reference:
            ref_batch = batch if batch in reference else max(reference)
            rows = min(batch, ref_batch)
            d = float(np.abs(out[-1][:rows] - reference[ref_batch][:rows]).max())
            drift = d if drift is None else max(drift, d)
    return cells, rates, drift, probabilities


def run_throughput(args: argparse.Namespace, log: Any) -> list[Row]:
    from worker.models.onnx_backend import OnnxBackend, read_card_metadata

    rows: list[Row] = []
    for preset in args.presets:
        c.ensure_lookalike(preset, args.lookalikes, log)
        started = time.perf_counter()
        fp32 = c.load_preset(preset, "fp32", args.threads)
        log(f"{preset}: loaded {fp32.describe()} in {time.perf_counter() - started:.1f} s")
        arrays = probe_arrays(fp32, max(args.batches))
        if fp32.card.runtime == "onnx":  # opennsfw: ONNX fp32 only
            cells, rates, _, _ = bench_runtime(fp32, arrays, args, preset, None, log)
            rows.append(Row(preset, "onnx fp32 (bundled)", cells, rates, None, "real weights"))
            del fp32
            gc.collect()
            continue
        cells, rates, _, reference = bench_runtime(fp32, arrays, args, preset, None, log)
        rows.append(Row(preset, "torch fp32", cells, rates, 0.0, "reference"))
        if not args.no_bf16:
            bf16 = fp32.with_precision("bf16")
            cells, rates, drift, _ = bench_runtime(bf16, arrays, args, preset, reference, log)
            rows.append(Row(preset, "torch bf16", cells, rates, drift))
            del bf16
            gc.collect()
        if not args.no_onnx:
            try:
                path = c.onnx_export(fp32, args.onnx_dir, log)
                card = read_card_metadata(path)
                assert card is not None
                onnx = OnnxBackend(card, path, "cpu", args.threads)
            except Exception as exc:  # an export failure is a finding, not a crash
                note = f"export failed: {exc!r}"[:70]
                rows.append(Row(preset, "onnx fp32", {}, {}, None, note))
            else:
                cells, rates, drift, _ = bench_runtime(onnx, arrays, args, preset, reference, log)
                rows.append(Row(preset, "onnx fp32", cells, rates, drift))
                del onnx
        del fp32
        gc.collect()
    return rows


def onnx_is_faster(rows: list[Row], preset: str) -> bool:
    """Whether the ONNX export beat torch fp32 on the largest batch both measured."""
    torch_row = next((r for r in rows if r.preset == preset and r.runtime == "torch fp32"), None)
    onnx_row = next((r for r in rows if r.preset == preset and r.runtime == "onnx fp32"), None)
    if torch_row is None or onnx_row is None:
        return False
    common = set(torch_row.rates) & set(onnx_row.rates)
    return bool(common) and onnx_row.rates[max(common)] > torch_row.rates[max(common)]


def run_draft(args: argparse.Namespace, rows: list[Row], log: Any) -> tuple[list[list[str]], float]:
    import numpy as np

    from worker.decode import DecodeLimits, decode
    from worker.models.onnx_backend import OnnxBackend, read_card_metadata
    from worker.models.precision import export_path
    from worker.models.preprocess import draft_size

    rng = np.random.default_rng(2024)
    sizes = []
    for _ in range(args.images):
        long_side = int(rng.integers(3000, 4001))
        short_side = int(long_side * rng.choice([0.75, 0.5625, 0.6667, 1.0]))
        sizes.append((long_side, short_side) if rng.random() < 0.6 else (short_side, long_side))
    paths = c.ensure_jpegs(c.OUT / "draft-images", sizes, seed=7, log=log)
    blobs = [p.read_bytes() for p in paths]
    limits = DecodeLimits()
    # The exact decode is the same for every preset: decode (and time) it once.
    exact_frames, exact_decode_s = [], 0.0
    for data in blobs:
        t0 = time.perf_counter()
        exact_frames.append(decode(data, limits, None).frames[0])
        exact_decode_s += time.perf_counter() - t0
    megapixels = sum(w * h for w, h in sizes) / len(sizes) / 1e6
    log(
        f"draft: {len(blobs)} JPEGs, {megapixels:.1f} MP average, exact decode "
        f"{exact_decode_s / len(blobs) * 1000:.0f} ms/img"
    )
    table_rows = []
    for preset in args.presets:
        c.ensure_lookalike(preset, args.lookalikes, log)
        backend = c.load_preset(preset, "fp32", args.threads)
        # Score with the faster fp32 runtime of table 1 (torch or its ONNX export): both are
        # fp32, and exact and draft go through the same one.
        scorer = backend
        exported = export_path(args.onnx_dir, backend.card)
        if onnx_is_faster(rows, preset) and exported.is_file():
            card = read_card_metadata(exported)
            if card is not None:
                scorer = OnnxBackend(card, exported, "cpu", args.threads)
        draft = draft_size(backend.card)
        exact_arrays, draft_arrays = [], []
        exact_pre_s = draft_s = 0.0
        for data, frame in zip(blobs, exact_frames, strict=True):
            t0 = time.perf_counter()
            exact_arrays.append(backend.preprocess(frame))
            t1 = time.perf_counter()
            draft_arrays.append(backend.preprocess(decode(data, limits, draft).frames[0]))
            t2 = time.perf_counter()
            exact_pre_s += t1 - t0
            draft_s += t2 - t1
        scores = {}
        for name, arrays in (("exact", exact_arrays), ("draft", draft_arrays)):
            values = []
            for start in range(0, len(arrays), 8):
                output = scorer.forward(np.stack(arrays[start : start + 8]))
                values += [
                    scorer.postprocess(output, i).scores.nsfw_score
                    for i in range(len(output.probabilities))
                ]
            scores[name] = np.array(values)
        diff = np.abs(scores["draft"] - scores["exact"])
        n = len(blobs)
        exact_ms = (exact_decode_s + exact_pre_s) / n * 1000
        draft_ms = draft_s / n * 1000
        table_rows.append(
            [
                preset,
                f"{draft}px",
                str(n),
                f"{diff.max():.2e}",
                f"{diff.mean():.2e}",
                f"{scores['exact'].min():.3f}-{scores['exact'].max():.3f}",
                f"{exact_ms:.0f}",
                f"{draft_ms:.0f}",
                f"{exact_ms / draft_ms:.1f}x",
                f"{scorer.card.runtime} fp32",
            ]
        )
        log(
            f"  {preset}: max drift {diff.max():.2e}, {exact_ms:.0f} -> {draft_ms:.0f} ms/img "
            f"(scored with {scorer.card.runtime})"
        )
        del backend, scorer
        gc.collect()
    return table_rows, megapixels


def main() -> None:
    args = parse_args()
    c.use_lookalike_hub(args.lookalikes)
    console = c.console()
    err = c.console()
    err.stderr = True

    def log(message: str) -> None:
        err.print(f"[dim]{message}[/dim]")

    started = time.perf_counter()
    console.print(c.header("modq bench/models.py"))
    if warning := c.busy_warning():
        console.print(warning)
    rows = run_throughput(args, log)
    batches = args.batches
    console.print(
        c.table(
            "Backend.forward, images/second on preloaded arrays",
            ["preset", "runtime", *[f"batch {b}" for b in batches], "max |p - p_fp32|", "note"],
            [
                [
                    r.preset,
                    r.runtime,
                    *[r.cells.get(b, "-") for b in batches],
                    "ref" if r.note == "reference" else c.fmt_drift(r.drift),
                    r.note,
                ]
                for r in rows
            ],
        )
    )
    if not args.no_draft:
        draft_rows, megapixels = run_draft(args, rows, log)
        console.print(
            c.table(
                f"Draft-decode drift on {args.images} photo-like JPEGs of 3000-4000 px "
                f"({megapixels:.1f} MP average); ms/img = decode + preprocess, one thread",
                [
                    "preset",
                    "draft",
                    "images",
                    "max |Δ nsfw|",
                    "mean |Δ nsfw|",
                    "exact scores",
                    "exact ms/img",
                    "draft ms/img",
                    "speed-up",
                    "scored by",
                ],
                draft_rows,
            )
        )
    console.print(
        "hub presets: random-weight look-alikes (real architecture, speed and code path; "
        "scores meaningless). opennsfw: real bundled weights."
    )
    console.print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
