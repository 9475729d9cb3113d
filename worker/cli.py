"""The `modq` command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.cli_bank import register as register_bank_commands
from worker.cli_calibrate import register as register_calibrate_commands
from worker.cli_explain import register as register_explain_commands
from worker.cli_finetune import register as register_finetune_commands
from worker.cli_index import register as register_index_commands
from worker.cli_queue import register as register_queue_commands
from worker.config import Settings
from worker.errors import ModqError
from worker.log import configure_logging

if TYPE_CHECKING:
    from worker.scan import ScanSummary

__all__ = ["app", "main"]

app = typer.Typer(help="modq: moderate images with NSFW classifiers.", no_args_is_help=True)
models_app = typer.Typer(help="List, inspect and export models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
schemas_app = typer.Typer(help="The wire contract as JSON Schema.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
register_queue_commands(app)
register_index_commands(app)
register_bank_commands(app)
register_calibrate_commands(app)
register_explain_commands(app)
register_finetune_commands(app)
console = Console(stderr=True)


class FailOn(StrEnum):
    never = "never"
    block = "block"
    review = "review"
    error = "error"


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="preset, dir, .onnx or Org/name[@rev] [env MODQ_MODEL]"),
]
PrecisionOpt = Annotated[
    str | None, typer.Option(help="auto, fp32, bf16 or fp16 [env MODQ_PRECISION]")
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N [env MODQ_DEVICE]")]


def _settings(**overrides: object) -> Settings:
    return Settings.with_options(**overrides)


@app.command()
def scan(
    paths: Annotated[list[Path], typer.Argument(help="files and folders to scan")],
    model: ModelOpt = None,
    report: Annotated[Path, typer.Option(help="JSONL report, one object per input")] = Path(
        "modq-report.jsonl"
    ),
    quarantine_to: Annotated[
        Path | None, typer.Option(help="move blocked images into this folder")
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="default, strict, lenient or a JSON file")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="largest batch per forward pass")] = None,
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
        typer.Option(
            help="also stream every embedding to file:///dir, s3://bucket/prefix/ or "
            "redis-stream://name [env MODQ_EMBEDDING_SINK]"
        ),
    ] = None,
    all_files: Annotated[
        bool,
        typer.Option("--all-files", help="in folders, scan every file, not only image suffixes"),
    ] = False,
    fail_on: Annotated[
        FailOn, typer.Option(help="exit 1 when anything reaches this verdict")
    ] = FailOn.never,
) -> None:
    """Moderate files and folders in-process, with the same pipeline the queue worker runs."""
    settings = _settings(
        model=model,
        policy=policy,
        max_batch_size=batch_size,
        precision=precision,
        device=device,
        exact_decode=exact_decode or None,
        embedding_sink=embedding_sink,
    )
    configure_logging(settings.log_level, json=settings.logs_json(worker=False))
    from worker.scan import run_scan

    try:
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
        console.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc}')}")
        raise typer.Exit(2) from exc
    _print_summary(summary, report)
    if _failed(summary, fail_on):
        raise typer.Exit(1)


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


def _print_summary(summary: ScanSummary, report: Path) -> None:
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
    out = Console()
    out.print(table)
    if summary.errors:
        out.print(
            "errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.errors.items()))
        )
    if summary.model:
        out.print(f"model: {summary.model}")
    out.print(f"full report: {report.resolve()}")


@models_app.command("list")
def models_list() -> None:
    """Each preset: labels, input size, licence, and whether it is on this machine."""
    from worker.models.registry import PRESETS
    from worker.models.status import availability

    table = Table(title="modq models")
    for column in ("preset", "runtime", "labels", "input", "licence", "available"):
        table.add_column(column)
    missing = []
    for preset in PRESETS.values():
        available = availability(preset)
        if available.startswith("no: "):
            missing.append(f"  {preset.name}: {available[4:]}")
            available = "no"
        table.add_row(
            preset.name,
            preset.runtime,
            ", ".join(preset.labels),
            str(preset.input_size),
            preset.license,
            available,
        )
    out = Console()
    out.print(table)
    if missing:
        out.print("Fetch a missing model where the hub is reachable:\n" + "\n".join(missing))


@models_app.command("info")
def models_info(
    spec: Annotated[str, typer.Argument(help="preset, dir, .onnx or Org/name[@rev]")],
) -> None:
    """Everything modq knows about one model (its card), read from its files."""
    from worker.models.factory import build_card
    from worker.models.registry import resolve

    try:
        resolved = resolve(spec)
        card = build_card(resolved)
    except ModqError as exc:
        console.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc}')}")
        raise typer.Exit(2) from exc
    info = json.loads(card.to_json())
    info["path"] = str(resolved.path)
    info["unsafe_labels"] = list(card.unsafe_labels)
    Console().print_json(json.dumps(info))


@models_app.command("export-onnx")
def models_export_onnx(
    spec: Annotated[str, typer.Argument(help="a torch model: preset, dir or Org/name[@rev]")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="where to write; default: modq's ONNX cache, where precision auto finds it"
        ),
    ] = None,
) -> None:
    """Export a torch model to ONNX (fp32, dynamic batch) with its model card."""
    from worker.models.export import export_onnx
    from worker.models.factory import create_backend
    from worker.models.precision import export_path

    settings = Settings()
    try:
        backend = create_backend(spec, device="cpu", precision="fp32")
        target = out or export_path(settings.onnx_dir, backend.card)
        export_onnx(backend, target)
    except ModqError as exc:
        console.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc}')}")
        raise typer.Exit(2) from exc
    Console().print(f"wrote {target}")


@schemas_app.command("export")
def schemas_export(
    out: Annotated[Path, typer.Option(help="folder for the .json files")] = Path("schemas"),
) -> None:
    """Write the JSON Schemas of modq's messages (generated from the pydantic models)."""
    from worker.schemas import write_all

    for path in write_all(out):
        Console().print(f"wrote {path}")


def main() -> None:
    app()
