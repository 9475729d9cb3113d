"""`modq finetune`: train on a team's own labels from the command line.

Settings (model, device, threads, decode limits, cache folder) enter here once, from the
options and the ``MODQ_`` environment, and go down as ``FinetuneOptions``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.cli.support import DeviceOpt, fail
from worker.config import Settings
from worker.errors import ModqError
from worker.log import configure_logging

if TYPE_CHECKING:
    from worker.finetune import EpochMetrics, FinetuneResult, ReadOptions
    from worker.finetune import Progress as FinetuneProgress

__all__ = ["register"]

console = Console(stderr=True, soft_wrap=True)
EMBEDDING_CACHE = "embeddings.sqlite3"


class Mode(StrEnum):
    head = "head"
    full = "full"


class _EpochRows:
    """One table row per epoch, printed as the epoch ends, columns aligned across rows."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.first = True

    def __call__(self, metrics: EpochMetrics) -> None:
        table = Table(box=box.SIMPLE_HEAD, show_header=self.first, show_edge=False)
        labels = list(metrics.f1)  # in label order
        columns = ["epoch", "train loss", "val loss", "val acc"]
        columns += [f"F1 {label}" for label in labels]
        for name in columns:
            table.add_column(name, justify="right", width=max(10, len(name)), no_wrap=True)
        train = "-" if metrics.train_loss is None else f"{metrics.train_loss:.4f}"
        table.add_row(
            str(metrics.epoch),
            train,
            f"{metrics.val_loss:.4f}",
            f"{metrics.val_accuracy:.3f}",
            *(f"{metrics.f1[label]:.3f}" for label in labels),
        )
        self.out.print(table)
        self.first = False


class _Hooks:
    """A progress bar while images are read and embedded, then the epoch rows."""

    def __init__(self, out: Console) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.rows = _EpochRows(out)
        self.task = self.bar.add_task("reading", total=0, start=False)
        self.running = False

    def start(self, what: str, total: int) -> None:
        self.bar.update(self.task, description=what, total=total)
        self.bar.start_task(self.task)
        self.bar.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.bar.stop()
            self.running = False

    def advance(self, count: int) -> None:
        self.bar.advance(self.task, count)

    def epoch(self, metrics: EpochMetrics) -> None:
        self.stop()
        self.rows(metrics)

    def progress(self) -> FinetuneProgress:
        from worker.finetune import Progress as FinetuneProgress

        return FinetuneProgress(self.start, self.advance, self.epoch)


def finetune(
    data_dir: Annotated[Path, typer.Argument(help="one sub-folder per label, images inside")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the model into")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="base model: preset, dir or .onnx")
    ] = None,
    mode: Annotated[
        Mode, typer.Option(help="head: linear probe on cached embeddings; full: all weights")
    ] = Mode.head,
    unsafe_label: Annotated[
        list[str] | None,
        typer.Option("--unsafe-label", help="a label that means unsafe (repeatable)"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="most epochs [head 100, full 5]")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(min=0.0, help="learning rate [head 1e-2, full 1e-4]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="[head 64, full 16]")] = None,
    val_fraction: Annotated[float, typer.Option(help="held out per label, stratified")] = 0.2,
    seed: Annotated[int, typer.Option(help="the split and the shuffling")] = 0,
    patience: Annotated[
        int, typer.Option(min=1, help="epochs without a lower validation loss before stopping")
    ] = 3,
    max_unreadable: Annotated[
        int, typer.Option(min=0, help="images that may fail to decode before the run stops")
    ] = 100,
    device: DeviceOpt = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="do not keep embeddings on disk for the next run")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="replace a model already in --out")
    ] = False,
) -> None:
    """Fine-tune a model on your own labels; writes a model directory `--model` loads."""
    overrides = {"model": model, "device": device}
    settings = Settings.with_options(**overrides)
    configure_logging(settings.log_level, json=settings.logging.writes_json(worker=False))
    from worker.finetune import FinetuneOptions
    from worker.finetune import finetune as run_finetune

    stdout = Console()
    hooks = _Hooks(stdout)
    try:
        options = FinetuneOptions(
            model=settings.model,
            mode="full" if mode is Mode.full else "head",
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            patience=patience,
            unsafe_labels=tuple(unsafe_label or ()),
            device=settings.device,
            threads=settings.threads,
            read=_read_options(settings, max_unreadable),
            embedding_cache=None if no_cache else settings.cache_dir / EMBEDDING_CACHE,
            force=force,
        )
        result = run_finetune(data_dir, out, options, hooks.progress())
    except ModqError as exc:
        raise fail(exc) from exc
    finally:
        hooks.stop()
    _print_result(stdout, result)


def _read_options(settings: Settings, max_unreadable: int) -> ReadOptions:
    from worker.finetune import ReadOptions

    # Only the first frame of an animation is trained on: decode no other.
    limits = settings.decode.limits.first_frame()
    return ReadOptions(limits, settings.exact_decode, max_unreadable=max_unreadable)


def _print_result(out: Console, result: FinetuneResult) -> None:
    history = result.history
    best, start = history.best, history.epochs[0]
    out.print(
        f"kept epoch {best.epoch}: validation accuracy {best.val_accuracy:.3f} "
        f"(untrained: {start.val_accuracy:.3f}), validation loss {best.val_loss:.4f}",
        soft_wrap=True,
    )
    if result.skipped:
        codes = sorted({s.code for s in result.skipped})
        out.print(f"skipped {len(result.skipped)} unreadable image(s): {', '.join(codes)}")
    out.print(
        f"images: {result.images}, embeddings from cache: {result.from_cache}; "
        f"reading {result.extract_seconds:.1f} s, training {result.train_seconds:.1f} s"
    )
    out.print(f"unsafe labels: {', '.join(result.unsafe_labels)}")
    out.print(f"wrote {result.out} (model, metrics.json, confusion_matrix.png)")
    out.print(
        f"use it: modq scan --model {result.out} …  or  MODQ_MODEL={result.out} modq worker",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command()(finetune)
