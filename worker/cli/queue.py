"""`modq worker` and `modq submit`: the queue-mode commands."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from worker.cli.support import DeviceOpt, ModelOpt, fail, setting_option
from worker.config import Settings
from worker.errors import InvalidReference, ModqError

__all__ = ["expand_refs", "limit_malloc_arenas", "register"]

console = Console(stderr=True, soft_wrap=True)


def _as_ref(text: str) -> str:
    """A URI as given; a plain path becomes an absolute ``file://`` reference."""
    if "://" in text:
        return text
    from worker.storage.base import file_ref

    return file_ref(Path(text))


def expand_refs(refs: list[str], recursive: bool, settings: Settings) -> Iterator[str]:
    """Each reference; with ``recursive``, ``s3://bucket/prefix/`` pages through the bucket
    listing and a folder walks its images, lazily, so memory stays bounded."""
    for text in refs:
        ref = _as_ref(text)
        if recursive and ref.startswith("s3://"):
            from worker.storage.s3 import S3Store, parse_s3_ref

            location = parse_s3_ref(ref)
            store = S3Store(settings.allowed_buckets or [location.bucket], settings.s3_endpoint_url)
            yield from store.iter_objects(location.bucket, location.key)
        elif recursive and ref.startswith("file://"):
            from worker.scan import iter_files
            from worker.storage.base import file_ref, ref_to_path

            yield from (file_ref(path) for path in iter_files([ref_to_path(ref)], False))
        elif ref.endswith("/") and not recursive:
            raise InvalidReference(f"{ref} is a prefix or folder: add --recursive")
        else:
            yield ref


def submit(
    refs: Annotated[list[str], typer.Argument(help="s3://, file://, https:// or a path")],
    callback: Annotated[
        str | None, typer.Option(help="celery://task?queue=q, redis-stream://name or https://…")
    ] = None,
    policy: Annotated[str | None, typer.Option(help="a policy the workers know")] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="expand s3:// prefixes and folders")
    ] = False,
    embed: Annotated[bool, typer.Option("--embed", help="ask for the embedding")] = False,
    broker: Annotated[str | None, setting_option(env="MODQ_BROKER_URL", help="broker URL")] = None,
) -> None:
    """Enqueue images for the workers; prints one `request_id<TAB>reference` line each."""
    from worker.queue.client import Client

    settings = Settings(**({"broker_url": broker} if broker else {}))  # type: ignore[arg-type]
    count = 0
    try:
        with Client(settings) as client:
            requests = (
                client.request(ref, callback=callback, policy=policy, embed=embed)
                for ref in expand_refs(refs, recursive, settings)
            )
            for sent in client.send_many(requests):
                sys.stdout.write(f"{sent.request_id}\t{sent.image}\n")
                count += 1
    except ModqError as exc:
        raise fail(exc) from exc
    except ValueError as exc:  # a request the wire model refuses
        console.print(f"[red]invalid request[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    console.print(f"enqueued {count} request(s) on {settings.queue}")


def worker(
    concurrency: Annotated[
        int | None,
        setting_option("--concurrency", "-c", env="MODQ_CONCURRENCY", help="task threads"),
    ] = None,
    queue: Annotated[
        str | None, setting_option("--queue", "-Q", env="MODQ_QUEUE", help="queue to consume")
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    hostname: Annotated[str, typer.Option("--hostname", "-n")] = "modq@%h",
) -> None:
    """Run a queue worker: one process, one model, task threads feeding the dynamic batcher."""
    overrides = {"concurrency": concurrency, "queue": queue, "model": model, "device": device}
    settings = Settings.with_options(**overrides)
    limit_malloc_arenas(settings.malloc_arenas)
    from worker.queue.app import create_app

    app = create_app(settings, worker=True)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.task_threads}",
            f"--queues={settings.queue}",
            f"--prefetch-multiplier={settings.prefetch_multiplier}",
            f"--loglevel={settings.log_level}",
            f"--hostname={hostname}",
            *(["--task-events"] if settings.task_events else []),
            "--without-gossip",
            "--without-mingle",
        ]
    )


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas before the task threads start. Each thread otherwise gets
    an arena of its own that grows and is rarely given back, so a worker with dozens of
    threads creeps up in resident memory while holding nothing (the MALLOC_ARENA_MAX advice
    for threaded servers). A no-op off glibc or with ``arenas`` 0."""
    if arenas <= 0:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    m_arena_max = -8  # from glibc's malloc.h
    return bool(mallopt is not None and mallopt(m_arena_max, arenas) == 1)


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(worker)
