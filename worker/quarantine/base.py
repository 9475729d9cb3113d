"""Idempotent quarantine actions that never lose an image.

A move is copy → verify the copy's sha256 against the bytes that were scored → record →
delete the source. A crash between any two steps leaves the image in at least one place,
and running the move again finishes it. ``copy`` stops before the delete; ``tag`` (S3 only)
labels the source object in place. The action comes from the operator (``quarantine_action``)::

    Quarantine                  apply(ref, sha256, record) -> location
    ├── LocalQuarantine         file:// sources into a directory         move · copy
    └── S3Quarantine            s3:// sources into s3://bucket/prefix/   move · copy · tag
                                file:// sources into s3://bucket/prefix/ move · copy

Nothing is ever deleted or tagged unless it still holds the scored bytes: a source that now
holds other bytes (a new upload took the name) raises ``SourceChanged`` and stays.
``http(s)://`` images belong to someone else and are only read: ``handles`` says no.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from worker.config import QuarantineAction
from worker.errors import ConfigError

__all__ = ["Quarantine", "check_action", "file_sha256", "fsync_dir"]


class Quarantine(Protocol):
    action: QuarantineAction

    def handles(self, ref: str) -> bool:
        """Whether this quarantine can act on the image behind ``ref`` (by its scheme)."""
        ...

    def apply(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
        """Quarantine the image behind ``ref`` (whose scored bytes hash to ``sha256``);
        return its location."""
        ...


def check_action(action: str, allowed: tuple[str, ...], where: str) -> None:
    if action not in allowed:
        raise ConfigError(
            f"MODQ_QUARANTINE_ACTION={action!r} is not possible for {where}; "
            f"use one of: {', '.join(allowed)}"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
