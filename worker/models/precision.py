"""Pick the precision and runtime a model runs in.

``auto`` loads the fp32 reference, then times each candidate the device can run (bf16, fp16
on CUDA, and an ONNX Runtime export of the model if one was made with
``modq models export-onnx``) on a fixed probe batch, and keeps the fastest whose scores stay
within ``MAX_DRIFT`` of fp32. The choice and the figures are logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from worker.errors import ModqError
from worker.log import get_logger
from worker.models.backend import Backend
from worker.models.card import ModelCard
from worker.models.factory import build_card, load_backend
from worker.models.registry import resolve

__all__ = ["MAX_DRIFT", "Trial", "export_path", "load_model", "probe_images"]

MAX_DRIFT = 0.01
log = get_logger(__name__)


@dataclass(frozen=True)
class Trial:
    backend: Backend
    images_per_second: float
    drift: float


def export_path(onnx_dir: Path, card: ModelCard) -> Path:
    safe = card.id.replace("/", "--").replace(":", "-")
    return onnx_dir / f"{safe}@{card.revision.replace(':', '-')}.onnx"


def probe_images(count: int = 4) -> list[Image.Image]:
    """A fixed, varied probe batch: noise, gradients and shapes at several sizes."""
    rng = np.random.default_rng(1234)
    images = []
    for i in range(count):
        width, height = 320 + 64 * i, 256 + 48 * (count - i)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        draw.ellipse(
            (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(200, 150, 120)
        )
        images.append(image)
    return images


def load_model(
    spec: str,
    device: str = "auto",
    precision: str = "auto",
    threads: int = 0,
    onnx_dir: Path | None = None,
) -> Backend:
    resolved = resolve(spec)
    card = build_card(resolved)
    if card.runtime != "onnx":
        from worker.models.torch_backend import resolve_device

        device = resolve_device(device)
    elif device == "auto":
        device = "cpu"
    if precision != "auto" or card.runtime == "onnx":
        return load_backend(
            resolved, card, device, "fp32" if precision == "auto" else precision, threads
        )
    base = load_backend(resolved, card, device, "fp32", threads)
    return choose(base, _candidates(base, onnx_dir, device, threads))


def _candidates(base: Backend, onnx_dir: Path | None, device: str, threads: int) -> list[Backend]:
    from worker.models.torch_backend import TorchBackend

    found: list[Backend] = []
    if isinstance(base, TorchBackend):
        for precision in ("bf16", "fp16") if device.startswith("cuda") else ("bf16",):
            found.append(base.with_precision(precision))
    exported = export_path(onnx_dir, base.card) if onnx_dir else None
    if exported is not None and exported.is_file():
        from worker.models.onnx_backend import OnnxBackend, read_card_metadata

        try:
            card = read_card_metadata(exported)
            if card is not None:
                found.append(OnnxBackend(card, exported, device, threads))
        except ModqError as exc:  # a stale export must not stop the model from loading
            log.warning("ignoring ONNX export", path=str(exported), error=str(exc))
    return found


def choose(base: Backend, candidates: list[Backend]) -> Backend:
    batch = np.stack([base.preprocess(image) for image in probe_images()])
    reference = base.forward(batch).probabilities
    trials = [_trial(base, batch, reference)] + [_trial(c, batch, reference) for c in candidates]
    eligible = [t for t in trials if t.drift <= MAX_DRIFT]
    best = max(eligible, key=lambda t: t.images_per_second)
    log.info(
        "precision chosen",
        model=base.card.id,
        chosen=f"{best.backend.card.runtime}/{best.backend.precision}",
        trials=[
            {
                "runtime": t.backend.card.runtime,
                "precision": t.backend.precision,
                "images_per_second": round(t.images_per_second, 2),
                "drift": round(t.drift, 5),
            }
            for t in trials
        ],
    )
    return best.backend


def _trial(backend: Backend, batch: np.ndarray, reference: np.ndarray) -> Trial:
    backend.forward(batch)  # warm-up
    started = time.perf_counter()
    probabilities = backend.forward(batch).probabilities
    elapsed = time.perf_counter() - started
    drift = float(np.abs(probabilities - reference).max())
    return Trial(backend, len(batch) / elapsed, drift)
