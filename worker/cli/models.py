"""`modq models` and `modq schemas`: what modq can load, and its wire contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.support import JsonOpt, fail, print_json, sub_app
from worker.config import Settings
from worker.errors import ModqError

__all__ = ["register"]

models_app = sub_app("List, inspect and export models.")
schemas_app = sub_app("The wire contract as JSON Schema.")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.add_typer(schemas_app, name="schemas")


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
