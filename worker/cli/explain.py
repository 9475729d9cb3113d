"""`modq explain`: one image, its score, and a heatmap of what drove the score."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from worker.cli.support import DeviceOpt, ModelOpt, fail
from worker.config import Settings
from worker.errors import ConfigError, CorruptImage, ModqError, ObjectNotFound

if TYPE_CHECKING:
    from PIL import Image

    from worker.explain import Explainer, Heatmap
    from worker.models.backend import Backend

__all__ = ["explain", "register"]

console = Console(stderr=True, soft_wrap=True)


def explain(
    image: Annotated[Path, typer.Argument(help="the image to explain")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG: the image with the heatmap")],
    model: ModelOpt = None,
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="heatmap opacity over the image")
    ] = 0.45,
    raw: Annotated[
        Path | None,
        typer.Option(help="also save the heatmap on the model's grid (.npy, float32 in [0, 1])"),
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Score IMAGE and write it with a heatmap of what drove the score: attention rollout
    for ViT models, Grad-CAM for convolutional ones. A reviewer's aid, not proof."""
    try:
        settings = _settings(model=model, device=device)
        picture = read_image(image, settings)
        backend, explainer = _load(settings)
        scores = backend.predict([picture])[0].scores
        heatmap = explainer.explain(picture)
        _write(explainer.overlay(picture, heatmap, alpha), out, heatmap, raw)
    except ModqError as exc:
        raise fail(exc) from exc
    _print(backend, scores.nsfw_score, scores.level, heatmap, out, raw)


def _settings(**overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ConfigError(problems) from exc


def read_image(path: Path, settings: Settings) -> Image.Image:
    """``path`` through modq's guarded decoder (the same limits as the pipeline; the first
    frame of an animation). Never draft-decoded: the overlay keeps the image's own size."""
    from worker.decode import decode

    limits = settings.decode.limits.first_frame()
    if not path.is_file():
        raise ObjectNotFound(f"{path}: no such file")
    try:
        with path.open("rb") as handle:
            # One byte over the cap is enough for decode to refuse a file that is too large.
            data = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        raise CorruptImage(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    return decode(data, limits).frames[0]


def _load(settings: Settings) -> tuple[Backend, Explainer]:
    from worker.explain import create_explainer
    from worker.models.factory import create_backend

    # fp32: the reference precision, which the explainers' own model copies run at too.
    backend = create_backend(settings.model, settings.device, "fp32", settings.threads)
    return backend, create_explainer(backend)


def _write(overlay: Image.Image, out: Path, heatmap: Heatmap, raw: Path | None) -> None:
    import numpy as np

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        overlay.save(out, format="PNG")
        if raw is not None:
            raw.parent.mkdir(parents=True, exist_ok=True)
            with raw.open("wb") as handle:
                np.save(handle, heatmap.values)
    except OSError as exc:
        raise ConfigError(f"cannot write the heatmap: {exc}") from exc


def _print(
    backend: Backend,
    nsfw_score: float,
    level: str | None,
    heatmap: Heatmap,
    out: Path,
    raw: Path | None,
) -> None:
    stdout = Console()
    card = backend.card
    stdout.print(f"model: {escape(card.id)}@{escape(card.revision)} ({card.runtime}, fp32)")
    graded = f" (level {level})" if level is not None else ""
    stdout.print(f"nsfw_score: {nsfw_score:.6f}{graded}")
    rows, columns = heatmap.values.shape
    stdout.print(f"method: {heatmap.method} on a {rows}x{columns} grid; target: {heatmap.target}")
    if float(heatmap.values.max()) == 0.0:
        stdout.print("no region raises the score: the heatmap is empty")
    stdout.print(f"wrote {escape(str(out))}" + (f" and {escape(str(raw))}" if raw else ""))


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
