"""Shared helpers for the benchmarks: paths, the offline look-alike cache, photo-like JPEGs,
timing and table printing.

Import this module *before* anything that imports ``huggingface_hub`` (``worker.models``,
``transformers``): ``use_lookalike_hub`` must set ``HF_HUB_CACHE`` before the hub library
reads its constants.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
DEFAULT_LOOKALIKES = OUT / "lookalikes"
ALL_PRESETS = ("opennsfw", "marqo", "falconsai", "freepik", "adamcodd")
HUB_PRESETS = ("marqo", "falconsai", "freepik", "adamcodd")


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies under it (for printing)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Look-alikes in a private, offline Hugging Face cache


def use_lookalike_hub(lookalikes: Path) -> Path:
    """Point huggingface_hub at ``<lookalikes>/hub``, offline. Call before importing it."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("use_lookalike_hub() must run before huggingface_hub is imported")
    hub = lookalikes / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_CACHE"] = str(hub)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return hub


def ensure_lookalike(preset: str, lookalikes: Path, log: Callable[[str], None] = print) -> None:
    """Build the full-size look-alike of a hub preset once, and install it in the hub cache
    under the preset's pinned revision, so the preset name resolves to it offline."""
    if preset not in HUB_PRESETS:
        return
    from worker.models.lookalike import build_lookalike, install_in_hub_cache, preset_commit
    from worker.models.registry import PRESETS

    folder = lookalikes / preset
    done = folder / ".complete"
    if not done.is_file():
        started = time.perf_counter()
        log(f"building the {preset} look-alike into {rel(folder)} (once) …")
        build_lookalike(preset, folder)
        done.write_text("ok\n")
        log(f"  built in {time.perf_counter() - started:.1f} s")
    hub_id = PRESETS[preset].hub_id
    assert hub_id is not None
    install_in_hub_cache(folder, lookalikes / "hub", hub_id, preset_commit(preset))


def load_preset(preset: str, precision: str = "fp32", threads: int = 0) -> Any:
    """The preset's backend at a fixed precision, on the CPU, through the preset code path."""
    from worker.models.factory import create_backend

    return create_backend(preset, "cpu", precision, threads)


def onnx_export(backend: Any, onnx_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Export ``backend`` (torch fp32) once into ``onnx_dir``, under the file name
    ``modq models export-onnx`` uses; reuse the file afterwards."""
    from worker.models.export import export_onnx
    from worker.models.onnx_backend import read_card_metadata
    from worker.models.precision import export_path

    target = export_path(onnx_dir, backend.card)
    if target.is_file():
        try:
            read_card_metadata(target)
        except Exception as exc:  # a card written by an older modq: export again
            log(f"{rel(target)} holds a card this modq cannot read ({exc!r}); re-exporting")
            target.unlink()
    if not target.is_file():
        started = time.perf_counter()
        log(f"exporting {backend.card.id} to {rel(target)} (once) …")
        export_onnx(backend, target)
        log(f"  exported in {time.perf_counter() - started:.1f} s")
    return target


# --------------------------------------------------------------------------------------------
# Photo-like JPEGs, deterministic


def photo_like(seed: int, width: int, height: int) -> Image.Image:
    """Smooth colour gradients, soft-edged shapes (some skin-toned), texture and mild noise.

    Composed at a quarter of the size and upscaled bicubic, so edges are soft like a photo's;
    texture and noise give JPEG the fine detail a photo has (~0.2 bytes/pixel at quality 88).
    """
    rng = np.random.default_rng(seed)
    sw, sh = max(8, width // 4), max(8, height // 4)
    field = rng.integers(20, 236, (3 + seed % 3, 4 + seed % 4, 3), dtype=np.uint8)
    canvas = Image.fromarray(field).resize((sw, sh), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    skin = [(224, 172, 140), (198, 134, 99), (141, 85, 62), (241, 194, 167)]
    for _ in range(int(rng.integers(5, 12))):
        x0, y0 = int(rng.integers(-sw // 4, sw)), int(rng.integers(-sh // 4, sh))
        x1 = x0 + int(rng.integers(sw // 10, sw // 2 + 2))
        y1 = y0 + int(rng.integers(sh // 10, sh // 2 + 2))
        if rng.random() < 0.4:
            colour = skin[int(rng.integers(len(skin)))]
        else:
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            points = [
                (int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))) for _ in range(5)
            ]
            draw.polygon(points, fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.2))
    # Mid-frequency texture (fabric, foliage, skin at a distance), then per-pixel noise.
    texture = rng.normal(0.0, 10.0, (sh, sw, 1)).astype(np.float32)  # upscaled 4x below
    small = np.asarray(canvas, dtype=np.float32) + texture
    canvas = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
    big = np.asarray(canvas.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-9, 10, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def ensure_jpegs(
    folder: Path, sizes: list[tuple[int, int]], seed: int, log: Callable[[str], None] = print
) -> list[Path]:
    """One photo-like JPEG per (width, height) in ``folder``, written only where missing: the
    file name holds the index and size, and the image depends on (seed, index) alone."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    wanted = {"seed": seed, "version": 2}
    if not manifest.is_file() or json.loads(manifest.read_text()) != wanted:
        for old in folder.glob("img[0-9][0-9][0-9][0-9]_*.jpg"):  # only files named here
            old.unlink()
        manifest.write_text(json.dumps(wanted))
    paths = [folder / f"img{i:04d}_{w}x{h}.jpg" for i, (w, h) in enumerate(sizes)]
    missing = [(i, path) for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        started = time.perf_counter()
        log(f"generating {len(missing)} photo-like JPEGs into {rel(folder)} (once) …")
        for i, path in missing:
            w, h = sizes[i]
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(jpeg_bytes(photo_like(seed * 100_003 + i, w, h)))
            partial.replace(path)
        log(f"  generated in {time.perf_counter() - started:.1f} s")
    return paths


# --------------------------------------------------------------------------------------------
# Timing and output


@dataclass(frozen=True)
class Timed:
    seconds_per_call: float  # the median call: robust to a neighbour stealing the CPU briefly
    calls: int
    total_seconds: float


def time_call(
    fn: Callable[[], object], min_seconds: float = 1.0, max_calls: int = 1000, warmup: int = 1
) -> Timed:
    """Warm up, then repeat ``fn`` until at least ``min_seconds`` have passed (at least once);
    the median call time."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds or len(times) >= max_calls:
            return Timed(float(np.median(times)), len(times), elapsed)


def cpu_busy(interval: float = 1.0) -> float | None:
    """How many CPUs other processes kept busy over ``interval`` seconds while this one
    slept (from /proc/stat; None where there is none). Call it before starting work."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def busy_warning() -> str | None:
    """A warning when other processes are using the CPUs right now (timings would be
    shared). The load average is no use here: the pipeline's own threads raise it."""
    busy, cpus = cpu_busy(), os.cpu_count() or 1
    if busy is not None and busy > 0.25:
        return (
            f"WARNING: other processes kept {busy:.1f} of {cpus} CPUs busy just before the "
            "run: timings are shared with them, low and noisy"
        )
    return None


def header(title: str) -> str:
    import onnxruntime
    import torch

    return (
        f"{title} | CPUs: {os.cpu_count()} ({platform.machine()}) | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | onnxruntime {onnxruntime.__version__} | "
        f"Python {platform.python_version()}"
    )


def console() -> Any:
    from rich.console import Console

    # Wide and without colour: the tables stay plain and whole in a terminal and in a log.
    return Console(width=250, highlight=False, soft_wrap=False)


def table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    return t


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def fmt_drift(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}" if value else "0"
