"""`modq index build`, `modq similar` and `modq cluster`: search and group embeddings."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.cli.support import fail, sub_app
from worker.config import Settings
from worker.errors import ModqError
from worker.log import configure_logging

__all__ = ["register"]

console = Console(stderr=True, soft_wrap=True)


class ClusterMethod(StrEnum):
    kmeans = "kmeans"
    hdbscan = "hdbscan"


def _settings(**overrides: object) -> Settings:
    settings = Settings.with_options(**overrides)
    # on stderr: stdout carries the results
    configure_logging(settings.log_level, json=settings.logging.writes_json(worker=False))
    return settings


def index_build(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="scan reports (--embed), shard folders or files, s3://bucket/prefix/, "
            "redis-stream://name"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="the index folder to write")],
) -> None:
    """Build a vector index (HNSW, cosine) from embeddings: one entry per distinct image."""
    from itertools import chain

    from worker.embeddings import RecordSource
    from worker.similarity import VectorIndex

    settings = _settings()
    readers = [RecordSource(source, settings.endpoints) for source in sources]
    try:
        index = VectorIndex.build(chain.from_iterable(readers))
        index.save(out)
    except ModqError as exc:
        raise fail(exc) from exc
    skipped = sum(reader.skipped for reader in readers)
    Console().print(
        f"indexed {len(index)} images ({index.meta['dim']}-d, {index.model}) into {out}"
        + (f"; {skipped} rows without an embedding skipped" if skipped else "")
    )


def similar(
    target: Annotated[str, typer.Argument(help="an image (path, file://, s3://) or a request id")],
    index_dir: Annotated[Path, typer.Option("--index", help="an index from `modq index build`")],
    k: Annotated[int, typer.Option("-k", min=1, help="how many neighbours")] = 10,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="the index's model, when no preset")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """The indexed images nearest to an image or to an indexed request, by cosine similarity."""
    from worker.similarity import VectorIndex, embed_image, model_spec_for

    try:
        index = VectorIndex.open(index_dir)
        known = index.find(target)
        if known is not None:
            vector = index.vector(known)
        else:
            settings = _settings(model=model or model_spec_for(index))
            vector = embed_image(target, index, settings)
        neighbours = index.search(vector, k)
    except ModqError as exc:
        raise fail(exc) from exc
    if as_json:
        for n in neighbours:
            print(json.dumps({"similarity": round(n.similarity, 6), **n.item.__dict__}))
        return
    table = Table(title=f"nearest to {target}")
    for column in ("#", "similarity", "verdict", "score", "image", "requests"):
        table.add_column(column)
    for rank, n in enumerate(neighbours, 1):
        item = n.item
        table.add_row(
            str(rank),
            f"{n.similarity:.4f}",
            item.verdict,
            f"{item.nsfw_score:.3f}",
            escape(item.where),
            escape(", ".join(item.request_ids[:3]) + ("…" if len(item.request_ids) > 3 else "")),
        )
    Console().print(table)


def cluster(
    index_dir: Annotated[Path, typer.Argument(help="an index from `modq index build`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the contact sheets")] = Path(
        "clusters"
    ),
    only: Annotated[
        list[str] | None, typer.Option(help="verdicts to cluster (repeatable): block, review")
    ] = None,
    method: Annotated[ClusterMethod, typer.Option(help="kmeans or hdbscan")] = ClusterMethod.kmeans,
    k: Annotated[int | None, typer.Option("-k", help="k-means clusters; default sqrt(n/2)")] = None,
    min_cluster_size: Annotated[int, typer.Option(help="HDBSCAN's smallest cluster")] = 5,
    per_sheet: Annotated[int, typer.Option(min=1, help="thumbnails per contact sheet")] = 36,
) -> None:
    """Group indexed images and write a contact sheet PNG per cluster, plus clusters.json."""
    from worker.similarity import VectorIndex, cluster_index, reader_for, write_sheet

    settings = _settings()
    try:
        index = VectorIndex.open(index_dir)
        clusters = cluster_index(index, only or (), method.value, k, min_cluster_size)
    except ModqError as exc:
        raise fail(exc) from exc
    members = [item for c in clusters for item in c.items[:per_sheet]]
    store = reader_for((item.where for item in members), settings.storage)
    limits = settings.decode.limits.first_frame()
    table = Table(title=f"{len(clusters)} clusters of {sum(len(c.items) for c in clusters)}")
    for column in ("cluster", "images", "mean score", "sheet"):
        table.add_column(column)
    summary = []
    for c in clusters:
        title = f"{c.name}: {len(c.items)} images ({'/'.join(only or ['all'])}, {method.value})"
        sheet = write_sheet(c.items[:per_sheet], title, out / f"{c.name}.png", store, limits)
        mean = sum(item.nsfw_score for item in c.items) / len(c.items)
        table.add_row(c.name, str(len(c.items)), f"{mean:.3f}", str(sheet))
        summary.append(
            {"cluster": c.name, "sheet": sheet.name, "images": [i.where for i in c.items]}
        )
    (out / "clusters.json").write_text(json.dumps(summary, indent=2) + "\n")
    Console().print(table)


def register(app: typer.Typer) -> None:
    index_app = sub_app("Vector indexes of embeddings.")
    index_app.command("build")(index_build)
    app.add_typer(index_app, name="index")
    app.command()(similar)
    app.command()(cluster)
