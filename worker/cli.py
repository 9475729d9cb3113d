"""The `modq` command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.cli_bank import register as register_bank_commands
from worker.cli_calibrate import register as register_calibrate_commands
from worker.cli_explain import register as register_explain_commands
from worker.cli_finetune import register as register_finetune_commands
from worker.cli_index import register as register_index_commands
from worker.cli_queue import register as register_queue_commands
from worker.cli_support import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_POLICY,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    fail,
    print_json,
    reader_may_leave,
    setting_option,
    sub_app,
)
from worker.config import Settings, settings_error
from worker.errors import ModqError
from worker.log import configure_logging
from worker.optional import missing_extra

if TYPE_CHECKING:
    from worker.scan import ScanSummary

__all__ = ["app", "main"]

app = sub_app("modq: moderate images with NSFW classifiers.")
models_app = sub_app("List, inspect and export models.")
app.add_typer(models_app, name="models")
schemas_app = sub_app("The wire contract as JSON Schema.")
app.add_typer(schemas_app, name="schemas")
register_queue_commands(app)
register_index_commands(app)
register_bank_commands(app)
register_calibrate_commands(app)
register_explain_commands(app)
register_finetune_commands(app)
console = Console(stderr=True, soft_wrap=True)


class FailOn(StrEnum):
    never = "never"
    block = "block"
    review = "review"
    error = "error"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"modq {version('modq')}")
        raise typer.Exit()


@app.callback()
def _root(
    _: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print modq's version and exit"
        ),
    ] = False,
) -> None:
    """modq: moderate images with NSFW classifiers."""


def _settings(**overrides: object) -> Settings:
    return Settings.with_options(**overrides)


@app.command()
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
    settings = _settings(
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


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Each preset: labels, input size, licence, and whether it is on this machine."""
    from worker.models.registry import PRESETS
    from worker.models.status import availability

    if as_json:
        print_json([
            {
                "preset": preset.name,
                "runtime": preset.runtime,
                "labels": list(preset.labels),
                "input_size": preset.input_size,
                "license": preset.license,
                "hub_id": preset.hub_id,
                "revision": preset.revision,
                "available": availability(preset),
            }
            for preset in PRESETS.values()
        ])  # fmt: skip
        return
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
        out.print("How to get the missing ones:\n" + "\n".join(missing), markup=False)


@models_app.command("info")
def models_info(
    spec: Annotated[str, typer.Argument(help="preset, dir, .onnx or Org/name[@rev]")],
    as_json: JsonOpt = False,
) -> None:
    """Everything modq knows about one model (its card), read from its files."""
    from worker.models.factory import build_card
    from worker.models.registry import resolve

    try:
        resolved = resolve(spec)
        card = build_card(resolved)
    except ModqError as exc:
        raise fail(exc) from exc
    info = json.loads(card.to_json())
    info["path"] = str(resolved.path)
    info["unsafe_labels"] = list(card.unsafe_labels)
    if as_json:
        print_json(info)
    else:
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
        raise fail(exc) from exc
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
    """The `modq` executable: the app, with the exit codes of ``cli_support`` for what
    escapes a command (a missing extra, a typed error, a crash, Ctrl-C)."""
    try:
        app()
    except ModuleNotFoundError as exc:
        if (missing := missing_extra(exc)) is None:
            raise _crashed() from exc
        raise SystemExit(fail(missing).exit_code) from exc
    except ModqError as exc:
        raise SystemExit(fail(exc).exit_code) from exc
    except ValidationError as exc:  # settings read outside Settings.with_options
        raise SystemExit(fail(settings_error(exc)).exit_code) from exc
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        raise _crashed() from exc


def _crashed() -> SystemExit:
    import traceback

    traceback.print_exc()
    console.print("[red]modq crashed[/red]: this is a bug; please report it with the traceback")
    return SystemExit(EXIT_CRASH)
