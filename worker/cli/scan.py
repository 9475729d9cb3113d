"""`modq scan`: the pipeline in-process over files and folders, into a JSONL report."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
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
    reader_may_leave,
    setting_option,
)
from worker.config import Settings
from worker.errors import ModqError
from worker.log import configure_logging

if TYPE_CHECKING:
    from worker.scan import ScanSummary

__all__ = ["FailOn", "register", "scan"]

console = Console(stderr=True, soft_wrap=True)


class FailOn(StrEnum):
    never = "never"
    block = "block"
    review = "review"
    error = "error"


def register(app: typer.Typer) -> None:
    app.command()(scan)


def scan(
    paths: Annotated[list[Path], typer.Argument(help="files and folders to scan", exists=True)],
    model: ModelOpt = None,
    report: Annotated[
        Path, typer.Option(help="JSONL report, one object per input; - for stdout")
    ] = Path("modq-report.jsonl"),
    quarantine_to: Annotated[
        Path | None, typer.Option(help="move blocked images into this folder")
    ] = None,
    policy: Annotated[
        str | None,
        setting_option(env="MODQ_POLICY", help="default, strict, lenient or a JSON file"),
    ] = None,
    batch_size: Annotated[
        int | None,
        setting_option(env="MODQ_MAX_BATCH_SIZE", help="largest batch per forward pass"),
    ] = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="skip the verdict cache")] = False,
    exact_decode: Annotated[
        bool, typer.Option("--exact-decode", help="decode JPEGs at full size")
    ] = False,
    embed: Annotated[
        bool, typer.Option("--embed", help="add the pre-logits embedding to each result")
    ] = False,
    embedding_sink: Annotated[
        str | None,
        setting_option(
            env="MODQ_EMBEDDING_SINK",
            help="also stream every embedding to file:///dir, s3://bucket/prefix/ or "
            "redis-stream://name",
        ),
    ] = None,
    all_files: Annotated[
        bool,
        typer.Option("--all-files", help="in folders, scan every file, not only image suffixes"),
    ] = False,
    fail_on: Annotated[
        FailOn, typer.Option(help="exit 1 when anything reaches this verdict")
    ] = FailOn.never,
    as_json: JsonOpt = False,
) -> None:
    """Moderate files and folders in-process, with the same pipeline the queue worker runs."""
    if as_json and str(report) == "-":
        raise typer.BadParameter("--json and --report - both write to stdout: choose one")
    settings = Settings.with_options(
        model=model,
        policy=policy,
        max_batch_size=batch_size,
        precision=precision,
        device=device,
        exact_decode=exact_decode or None,
        embedding_sink=embedding_sink,
    )
    configure_logging(settings.log_level, json=settings.logging.writes_json(worker=False))
    from worker.scan import run_scan

    try:
        with reader_may_leave():  # --report - | head
            summary = run_scan(
                settings,
                paths,
                report,
                quarantine_to,
                use_cache=not no_cache,
                embed=embed,
                all_files=all_files,
                progress=_progress(),
            )
    except ModqError as exc:
        raise fail(exc) from exc
    if as_json:
        print_json({**summary.to_json(), "report": str(report.resolve())})
    else:
        # With the report on stdout, the table goes to stderr: stdout stays pure JSONL.
        _print_summary(summary, report, Console(stderr=str(report) == "-"))
    if _failed(summary, fail_on):
        raise typer.Exit(EXIT_POLICY)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _failed(summary: ScanSummary, fail_on: FailOn) -> bool:
    if fail_on is FailOn.block:
        return summary.verdicts["block"] > 0
    if fail_on is FailOn.review:
        return summary.verdicts["block"] + summary.verdicts["review"] > 0
    if fail_on is FailOn.error:
        return sum(summary.errors.values()) > 0
    return False


def _print_summary(summary: ScanSummary, report: Path, out: Console) -> None:
    table = Table(title="modq scan")
    for column in (
        "images",
        "allow",
        "review",
        "block",
        "errors",
        "cached",
        "moved",
        "images/s",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.images),
        str(summary.verdicts["allow"]),
        str(summary.verdicts["review"]),
        str(summary.verdicts["block"]),
        str(sum(summary.errors.values())),
        str(summary.cache_hits),
        str(summary.quarantined),
        f"{summary.images_per_second:.1f}",
    )
    out.print(table)
    if summary.errors:
        out.print(
            "errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.errors.items()))
        )
    if summary.model:
        out.print(f"model: {summary.model}")
    out.print(f"full report: {'stdout' if str(report) == '-' else report.resolve()}")
