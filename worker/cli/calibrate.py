"""`modq calibrate`: thresholds for a policy, chosen on a team's labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.cli.support import (
    EXIT_POLICY,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    fail,
    print_json,
)
from worker.config import Settings
from worker.errors import ModqError
from worker.log import configure_logging

if TYPE_CHECKING:
    from worker.calibrate import Calibration, Operating

__all__ = ["EXIT_TARGET_MISSED", "calibrate", "register"]

# 0: policy written; 1: ran, but no threshold reaches the target (no policy.json);
# 2: modq could not run (bad labels file, unknown model), as for every modq command.
EXIT_TARGET_MISSED = EXIT_POLICY

console = Console(stderr=True, soft_wrap=True)


TargetPrecisionOpt = Annotated[
    float | None, typer.Option(help="block_at: the lowest threshold with this precision")
]
TargetRecallOpt = Annotated[
    float | None, typer.Option(help="block_at: the highest threshold with this recall")
]
ExactDecodeOpt = Annotated[
    bool, typer.Option("--exact-decode", help="decode JPEGs at full size (when the worker does)")
]


def calibrate(
    labels: Annotated[Path, typer.Argument(help="CSV of path,label rows")],
    model: ModelOpt = None,
    target_precision: TargetPrecisionOpt = None,
    target_recall: TargetRecallOpt = None,
    review_recall: Annotated[
        float, typer.Option(help="review_at: the highest threshold with this recall")
    ] = 0.95,
    out: Annotated[Path, typer.Option(help="folder for policy.json, report.json, charts")] = Path(
        "calibration"
    ),
    temperature: Annotated[
        bool, typer.Option("--temperature", help="fit temperature scaling; report ECE")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help="largest batch per forward pass")] = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    exact_decode: ExactDecodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score a labelled set with modq's pipeline and choose review_at and block_at.

    Without a target, block_at maximises F1. No threshold reaching the target: exit 1.
    """
    overrides = {
        "model": model,
        "max_batch_size": batch_size,
        "precision": precision,
        "device": device,
        "exact_decode": exact_decode or None,
    }
    try:
        settings = Settings.with_options(**overrides)  # a bad value: ConfigError
        configure_logging(settings.log_level, json=settings.logging.writes_json(worker=False))
        result = _run(settings, labels, target_precision, target_recall, review_recall, temperature)
        from worker.calibrate import write_outputs

        written = write_outputs(result, out)
    except ModqError as exc:
        raise fail(exc) from exc
    policy_file = out / "policy.json"
    if as_json:
        from worker.calibrate.report import report_document

        print_json({
            **report_document(result),
            "written": [str(path) for path in written],
            "not_written": [] if result.choice.met else [str(policy_file)],
        })  # fmt: skip
    else:
        _print(result, written, policy_file)
    if not result.choice.met:
        raise typer.Exit(EXIT_TARGET_MISSED)


def _run(
    settings: Settings,
    labels: Path,
    target_precision: float | None,
    target_recall: float | None,
    review_recall: float,
    temperature: bool,
) -> Calibration:
    from worker.calibrate import Request, load_labels, make_target
    from worker.calibrate import calibrate as run_calibration

    request = Request(
        labels, make_target(target_precision, target_recall), review_recall, temperature
    )
    images = load_labels(settings, labels)
    progress = Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task("score", total=len(images))
        return run_calibration(settings, request, images, lambda: progress.advance(task))


def _print(result: Calibration, written: list[Path], policy_file: Path) -> None:
    out = Console()
    scored = result.scored
    labels = result.labels
    out.print(
        f"model: {scored.model.id}@{scored.model.revision} "
        f"({scored.model.runtime}, {scored.model.precision})"
    )
    out.print(
        f"images scored: {len(labels)} (unsafe {int(labels.sum())}, "
        f"safe {int(len(labels) - labels.sum())}); left out: {len(scored.failed)}"
    )
    for failed in scored.failed:
        out.print(
            f"  left out, line {failed.image.line}: "
            + escape(f"{failed.image.name} [{failed.code}] {failed.message}")
        )
    out.print(
        f"ROC-AUC {result.roc_auc:.4f}   PR-AUC (average precision) {result.average_precision:.4f}"
    )
    out.print(_thresholds_table(result))
    for name, point in (("block_at", result.choice.block), ("review_at", result.choice.review)):
        out.print(_confusion_table(name, point))
    fit = result.temperature
    if fit is not None:
        bound = (
            " (at the search bound: the set is separated too well to fit T)" if fit.at_bound else ""
        )
        out.print(
            f"temperature T = {fit.temperature:.4f}{bound}; ECE (15 bins) "
            f"{fit.ece_before:.4f} before, {fit.ece_after:.4f} after. The worker applies "
            "thresholds to raw scores; T only reads scores as probabilities."
        )
    if not result.choice.met:
        console.print(
            f"[red]target not met[/red]: no threshold reaches {result.choice.target.describe()} "
            f"(best: precision {result.choice.block.confusion.precision:.4f} at "
            f"{result.choice.block.threshold:.6g}); {policy_file} was not written"
        )
    for path in written:
        out.print(f"wrote {path}")


def _thresholds_table(result: Calibration) -> Table:
    table = Table(
        title=f"thresholds (block_at target: {result.choice.target.describe()}; "
        f"review_at: recall >= {result.choice.review_recall:g})"
    )
    for column in ("", "threshold", "precision", "recall", "F1", "FPR", "flagged"):
        table.add_column(column, justify="right")
    for name, point in (("block_at", result.choice.block), ("review_at", result.choice.review)):
        c = point.confusion
        table.add_row(
            name,
            f"{point.threshold:.6g}",
            f"{c.precision:.4f}",
            f"{c.recall:.4f}",
            f"{c.f1:.4f}",
            f"{c.false_positive_rate:.4f}",
            str(c.tp + c.fp),
        )
    return table


def _confusion_table(name: str, point: Operating) -> Table:
    c = point.confusion
    table = Table(title=f"confusion at {name} = {point.threshold:.6g}")
    table.add_column("labelled")
    table.add_column(f"score >= {name}", justify="right")
    table.add_column(f"score < {name}", justify="right")
    table.add_row("unsafe", f"{c.tp} (TP)", f"{c.fn} (FN)")
    table.add_row("safe", f"{c.fp} (FP)", f"{c.tn} (TN)")
    return table


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
