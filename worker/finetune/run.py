"""One fine-tuning run: dataset, base model, training, and the model directory it writes.

The order is chosen so mistakes cost nothing: the dataset layout, the unsafe labels, the
mode against the runtime and the output folder are all checked before a single image is
decoded or a model weight is read.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from worker.errors import ConfigError, ModelConfigError
from worker.finetune.context import RunContext
from worker.finetune.data import Skipped, choose_unsafe_labels, scan_dataset
from worker.finetune.data import stratified_split as split_dataset
from worker.finetune.embed_cache import EmbeddingCache
from worker.finetune.extract import Extraction, ReadOptions, extract_embeddings, preprocess_dataset
from worker.finetune.modes import train_full, train_head_mode
from worker.finetune.report import plot_confusion, write_metrics
from worker.finetune.save import finish_output, staging_dir
from worker.finetune.train import History, OnEpoch, TrainOptions
from worker.models.backend import Backend
from worker.models.card import ModelCard
from worker.models.factory import build_card, load_backend
from worker.models.registry import resolve

__all__ = ["MODE_DEFAULTS", "FinetuneOptions", "FinetuneResult", "Mode", "Progress", "finetune"]

Mode = Literal["head", "full"]
# epochs, learning rate, batch size: a linear probe on standardised embeddings takes a high
# rate and many cheap epochs; a full fine-tune a small rate and few expensive ones.
MODE_DEFAULTS: dict[str, tuple[int, float, int]] = {
    "head": (100, 1e-2, 64),
    "full": (5, 1e-4, 16),
}


@dataclass(frozen=True)
class FinetuneOptions:
    model: str = "opennsfw"
    mode: Mode = "head"
    epochs: int | None = None  # None: MODE_DEFAULTS
    lr: float | None = None
    batch_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 3
    weight_decay: float = 0.01
    unsafe_labels: tuple[str, ...] = ()  # empty: the folder names modq reads as unsafe
    device: str = "auto"
    threads: int = 0
    read: ReadOptions = field(default_factory=ReadOptions)
    embedding_cache: Path | None = None  # None: embeddings are kept in memory only
    force: bool = False

    def __post_init__(self) -> None:
        """Refuse impossible settings before any image is read."""
        checks = {
            "--val-fraction must be between 0 and 1": 0 < self.val_fraction < 1,
            "--epochs must be at least 1": self.epochs is None or self.epochs >= 1,
            "--lr must be above 0": self.lr is None or self.lr > 0,
            "--batch-size must be at least 1": self.batch_size is None or self.batch_size >= 1,
            "--patience must be at least 1": self.patience >= 1,
        }
        problems = [rule for rule, ok in checks.items() if not ok]
        if problems:
            raise ConfigError("; ".join(problems))

    def train_options(self) -> TrainOptions:
        epochs, lr, batch = MODE_DEFAULTS[self.mode]
        return TrainOptions(
            epochs=self.epochs if self.epochs is not None else epochs,
            lr=self.lr if self.lr is not None else lr,
            batch_size=self.batch_size or batch,
            patience=self.patience,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )


class Progress:
    """Hooks a front end may fill: extraction progress and one call per epoch."""

    def __init__(
        self,
        start: Callable[[str, int], None] | None = None,
        advance: Callable[[int], None] | None = None,
        on_epoch: OnEpoch | None = None,
    ) -> None:
        self.start = start or (lambda _what, _total: None)
        self.advance = advance
        self.on_epoch = on_epoch


@dataclass
class FinetuneResult:
    out: Path
    labels: tuple[str, ...]
    unsafe_labels: tuple[str, ...]
    history: History
    backend: Backend  # the trained model as it is in memory, before it was written
    skipped: list[Skipped]
    counts: dict[str, dict[str, int]]  # label -> {"train": n, "val": n}
    from_cache: int
    extract_seconds: float
    train_seconds: float
    images: int  # images read (kept + skipped)
    val_files: list[Path]  # the held-out images, in dataset order


def finetune(
    data_dir: Path, out: Path, options: FinetuneOptions, progress: Progress | None = None
) -> FinetuneResult:
    """Train on ``data_dir`` (one sub-folder per label) and write the model to ``out``."""
    progress = progress or Progress()
    dataset = scan_dataset(data_dir)
    unsafe = choose_unsafe_labels(dataset.labels, list(options.unsafe_labels))
    resolved = resolve(options.model)
    card = build_card(resolved)
    if options.mode == "full" and card.runtime == "onnx":
        raise ModelConfigError(
            f"{card.id} runs on ONNX Runtime, which cannot train: --mode full needs a torch "
            "model (a preset such as marqo, falconsai, freepik or adamcodd, or a model "
            "directory); --mode head works on ONNX models"
        )
    staging = staging_dir(out, options.force)
    try:
        base = load_backend(resolved, card, _device(card, options.device), "fp32", options.threads)
        run = RunContext(options, dataset, unsafe, resolved, base, staging, out)
        return _train_and_write(run, out, progress)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _device(card: ModelCard, device: str) -> str:
    if card.runtime == "onnx":
        return "cpu" if device == "auto" else device
    from worker.models.torch_backend import resolve_device

    return resolve_device(device)


def _train_and_write(run: RunContext, out: Path, progress: Progress) -> FinetuneResult:
    progress.start(
        "embedding" if run.options.mode == "head" else "reading", len(run.dataset.samples)
    )
    extract_started = time.perf_counter()
    if run.options.mode == "head":
        run.extraction = _embeddings(run, progress)
    else:
        run.extraction = preprocess_dataset(
            run.base, run.dataset, run.options.read, progress.advance
        )
    extract_seconds = time.perf_counter() - extract_started
    labels = run.extraction.labels
    run.split = split_dataset(
        labels, run.dataset.labels, run.options.val_fraction, run.options.seed
    )
    trainer = train_head_mode if run.options.mode == "head" else train_full
    history, trained = trainer(run, run.options.train_options(), progress.on_epoch)
    _write_report(run, history, extract_seconds)
    finish_output(run.staging, out)
    return _result(run, out, history, trained(out), extract_seconds)


def _embeddings(run: RunContext, progress: Progress) -> Extraction:
    cache_path = run.options.embedding_cache
    cache = EmbeddingCache(cache_path) if cache_path is not None else None
    try:
        return extract_embeddings(run.base, run.dataset, run.options.read, cache, progress.advance)
    finally:
        if cache is not None:
            cache.close()


def _counts(run: RunContext) -> dict[str, dict[str, int]]:
    assert run.extraction is not None
    labels = run.extraction.labels
    train, val = (np.bincount(labels[i], minlength=len(run.dataset.labels)) for i in run.split)
    return {
        name: {"train": int(train[i]), "val": int(val[i])}
        for i, name in enumerate(run.dataset.labels)
    }


def _write_report(run: RunContext, history: History, extract_seconds: float) -> None:
    assert run.extraction is not None
    options = run.options
    payload = {
        "base_model": {
            "spec": options.model,
            "id": run.base.card.id,
            "revision": run.base.card.revision,
        },
        "labels": list(run.dataset.labels),
        "unsafe_labels": list(run.unsafe),
        "settings": {
            **asdict(options.train_options()),
            "mode": options.mode,
            "device": run.base.device,
            "val_fraction": options.val_fraction,
            "exact_decode": options.read.exact_decode,
        },
        "counts": _counts(run),
        "skipped": [
            {"file": str(s.path.relative_to(run.dataset.root)), "code": s.code, "error": s.message}
            for s in run.extraction.skipped
        ],
        "embeddings_from_cache": run.extraction.from_cache,
        "seconds": {"extract": round(extract_seconds, 3), "train": round(history.seconds, 3)},
        "epochs": [m.to_json() for m in history.epochs],
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "best": history.best.to_json(),
        "confusion_matrix": {
            "labels": list(run.dataset.labels),
            "matrix": history.confusion.tolist(),
        },
    }
    write_metrics(run.staging / "metrics.json", payload)
    title = f"validation, epoch {history.best_epoch} (accuracy {history.best.val_accuracy:.3f})"
    plot_confusion(
        run.staging / "confusion_matrix.png", history.confusion, run.dataset.labels, title
    )


def _result(
    run: RunContext, out: Path, history: History, trained: Backend, extract_seconds: float
) -> FinetuneResult:
    assert run.extraction is not None
    return FinetuneResult(
        out=out,
        labels=run.dataset.labels,
        unsafe_labels=run.unsafe,
        history=history,
        backend=trained,
        skipped=run.extraction.skipped,
        counts=_counts(run),
        from_cache=run.extraction.from_cache,
        extract_seconds=extract_seconds,
        train_seconds=history.seconds,
        images=len(run.extraction.samples) + len(run.extraction.skipped),
        val_files=[run.extraction.samples[i].path for i in run.split[1]],
    )
