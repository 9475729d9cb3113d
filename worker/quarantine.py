"""Idempotent quarantine moves that never lose a file.

A move is copy → verify the copy's sha256 against the bytes that were scored →
record → delete the source. A crash between any two steps leaves the image in at least one
place, and running the move again finishes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from worker.errors import ObjectNotFound, SourceChanged, StorageUnavailable
from worker.storage.local import LocalStore

__all__ = ["LocalQuarantine", "Quarantine"]


class Quarantine(Protocol):
    def move(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
        """Move the image behind ``ref`` (whose bytes hash to ``sha256``); return where."""
        ...


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalQuarantine:
    def __init__(self, destination: Path, store: LocalStore) -> None:
        self.destination = destination
        self.store = store

    def target_for(self, source: Path, sha256: str) -> Path:
        return self.destination / f"{sha256[:16]}-{source.name}"

    def move(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
        source = self.store.confine(ref)
        target = self.target_for(source, sha256)
        try:
            self.destination.mkdir(parents=True, exist_ok=True)
            if not (target.exists() and _file_sha256(target) == sha256):
                self._place_copy(source, target, sha256)
            self._write_record(target, {**record, "source": ref, "sha256": sha256})
            self._delete_source(source, sha256)
        except OSError as exc:
            raise StorageUnavailable(f"quarantine of {ref} failed: {exc}") from exc
        return str(target)

    def _place_copy(self, source: Path, target: Path, sha256: str) -> None:
        if not source.exists():
            raise ObjectNotFound(f"{source} is gone and no verified copy exists in quarantine")
        staging = target.with_name(target.name + ".partial")
        staging.unlink(missing_ok=True)
        # A real copy, never a hard link: a writer that later rewrites the source in place
        # must not be able to change the quarantined bytes.
        self._copy_bytes(source, staging)
        if _file_sha256(staging) != sha256:
            staging.unlink()
            raise SourceChanged(f"{source} changed since it was scored; left in place")
        os.replace(staging, target)
        _fsync_dir(target.parent)

    @staticmethod
    def _copy_bytes(source: Path, staging: Path) -> None:
        with source.open("rb") as src, staging.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())

    @staticmethod
    def _write_record(target: Path, record: dict[str, Any]) -> None:
        sidecar = target.with_name(target.name + ".json")
        staging = sidecar.with_name(sidecar.name + ".partial")
        staging.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(staging, sidecar)

    @staticmethod
    def _delete_source(source: Path, sha256: str) -> None:
        if not source.exists():
            return
        if _file_sha256(source) != sha256:
            # A new upload took the name; the scored bytes are safe in quarantine.
            raise SourceChanged(f"{source} now holds other bytes; not deleted")
        source.unlink()
        _fsync_dir(source.parent)
