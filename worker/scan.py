"""`modq scan`: walk files and folders, run the pipeline in-process, write a JSONL report."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from worker.config import Settings
from worker.errors import ConfigError
from worker.messages import CacheOutcome, ModerationResult, Status

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["IMAGE_SUFFIXES", "ScanSummary", "iter_files", "run_scan", "write_results"]

IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".mpo",
    }
)


def iter_files(paths: Iterable[Path], all_files: bool = False) -> Iterator[Path]:
    """Files named directly, and, under folders (recursively, in name order), the files with an
    image suffix (every non-hidden file with ``all_files``). The content decides the format;
    the suffix only chooses what a folder walk picks up."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if (
                    child.is_file()
                    and not hidden
                    and (all_files or child.suffix.lower() in IMAGE_SUFFIXES)
                ):
                    yield child
        else:
            yield path  # missing files become not_found results, never silently skipped


@dataclass
class ScanSummary:
    images: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    quarantined: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    model: str = ""

    def add(self, result: ModerationResult) -> None:
        self.images += 1
        if result.status is Status.ERROR and result.error is not None:
            self.errors[result.error.code] += 1
        if result.verdict is not None:
            self.verdicts[result.verdict.value] += 1
        if result.cache is not None and result.cache.outcome is CacheOutcome.EXACT:
            self.cache_hits += 1
        if result.action is not None and result.action.kind != "none":
            self.quarantined += 1

    @property
    def seconds(self) -> float:
        end = self.finished if self.finished is not None else time.perf_counter()
        return end - self.started

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        """The summary as ``modq scan --json`` prints it."""
        return {
            "images": self.images,
            "verdicts": {v: self.verdicts[v] for v in ("allow", "review", "block")},
            "errors": dict(sorted(self.errors.items())),
            "cached": self.cache_hits,
            "moved": self.quarantined,
            "images_per_second": round(self.images_per_second, 2),
            "model": self.model,
        }


def _check_writable(report: Path) -> None:
    """Before any work: a report that cannot be written is a usage error, not a crash after
    the model has loaded. Missing folders are created."""
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the report {report}: {exc.strerror or exc}") from exc
    if report.is_dir() or not os.access(report.parent, os.W_OK):
        what = "is a folder" if report.is_dir() else "is in a folder modq cannot write"
        raise ConfigError(f"cannot write the report {report}: it {what}")


def write_results(
    results: Iterable[ModerationResult], report: TextIO, summary: ScanSummary
) -> Iterator[ModerationResult]:
    """Append each result to the JSONL report as it arrives, and count it."""
    for result in results:
        report.write(result.model_dump_json(exclude_none=False) + "\n")
        summary.add(result)
        yield result
    report.flush()
    summary.finished = time.perf_counter()


def run_scan(
    settings: Settings,
    paths: list[Path],
    report: Path,
    quarantine_to: Path | None,
    use_cache: bool = True,
    embed: bool = False,
    all_files: bool = False,
    progress: Progress | None = None,
) -> ScanSummary:
    """Build the runtime for ``paths`` and scan them into ``report`` (JSONL; ``-`` is
    stdout): assess, act, write, image by image."""
    from worker.cache import SQLiteCache
    from worker.quarantine import LocalQuarantine
    from worker.runtime import build_runtime
    from worker.storage import LocalStore, file_ref

    to_stdout = str(report) == "-"
    if not to_stdout:
        _check_writable(report)
    files = list(iter_files(paths, all_files))
    store = LocalStore(p if p.is_dir() else p.parent for p in paths)
    cache = SQLiteCache(settings.verdict_db, settings.perceptual_radius) if use_cache else None
    quarantine = LocalQuarantine(quarantine_to, store) if quarantine_to else None
    # Enough threads to fill a batch while one runs, bounded by the cores: each thread holds
    # its decoded frames until its batch returns.
    concurrency = max(
        4, min(2 * settings.max_batch_size, settings.max_batch_size + 2 * (os.cpu_count() or 1))
    )
    try:
        runtime = build_runtime(
            settings, store=store, cache=cache, quarantine=quarantine, embed=embed
        )
    except BaseException:
        if cache is not None:  # the runtime closes it, once it exists
            cache.close()
        raise
    with runtime, nullcontext(sys.stdout) if to_stdout else report.open("w") as out:
        summary = ScanSummary(model=runtime.backend.describe())
        results = runtime.pipeline.process_many((file_ref(f) for f in files), concurrency)
        if progress is None:
            for _ in write_results(results, out, summary):
                pass
        else:
            with progress:
                task = progress.add_task("scan", total=len(files))
                for _ in write_results(results, out, summary):
                    progress.advance(task)
    return summary
