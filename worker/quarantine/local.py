"""Quarantine for local files: into a directory, with a JSON record beside each copy.

The source is reached as ``LocalStore`` reads it (walked from its root, no symlink followed
by the kernel, regular files only), and read, hashed and deleted through the directory that
walk holds open, so the file that is copied and deleted is the one that was confined."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from worker.config import QuarantineAction
from worker.errors import ObjectNotFound, SourceChanged, StorageUnavailable
from worker.quarantine.base import check_action, file_sha256, fsync_dir
from worker.storage import LocalStore
from worker.storage.local import Located

__all__ = ["LocalQuarantine", "delete_verified_file"]


class LocalQuarantine:
    def __init__(
        self, destination: Path, store: LocalStore, action: QuarantineAction = "move"
    ) -> None:
        check_action(action, ("move", "copy"), "local files")
        self.destination = destination
        self.store = store
        self.action = action

    def handles(self, ref: str) -> bool:
        return ref.startswith("file://")

    def target_for(self, source: Path, sha256: str) -> Path:
        return self.destination / f"{sha256[:16]}-{source.name}"

    def apply(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
        with self.store.locate(ref) as source:
            return self._apply(source, ref, sha256, record)

    def _apply(self, source: Located, ref: str, sha256: str, record: dict[str, Any]) -> str:
        target = self.target_for(Path(source.name), sha256)
        try:
            self.destination.mkdir(parents=True, exist_ok=True)
            if not self._verified(target, sha256):
                try:
                    self._place_copy(source, target, sha256)
                except ObjectNotFound:
                    # Moved meanwhile by a concurrent delivery of the same request?
                    if not self._verified(target, sha256):
                        raise
            self._write_record(
                target, {**record, "source": ref, "sha256": sha256, "action": self.action}
            )
            if self.action == "move":
                self._delete_source(source, sha256)
        except OSError as exc:
            raise StorageUnavailable(f"quarantine of {ref} failed: {exc}") from exc
        return str(target)

    @staticmethod
    def _verified(target: Path, sha256: str) -> bool:
        return target.exists() and file_sha256(target) == sha256

    def _place_copy(self, source: Located, target: Path, sha256: str) -> None:
        if not source.exists():
            raise ObjectNotFound(f"{source.ref} is gone and no verified copy exists in quarantine")
        staging = target.with_name(target.name + ".partial")
        staging.unlink(missing_ok=True)
        # A real copy, never a hard link: a writer that later rewrites the source in place
        # must not be able to change the quarantined bytes.
        self._copy_bytes(source, staging)
        if file_sha256(staging) != sha256:
            staging.unlink()
            raise SourceChanged(f"{source.ref} changed since it was scored; left in place")
        os.replace(staging, target)
        fsync_dir(target.parent)

    @staticmethod
    def _copy_bytes(source: Located, staging: Path) -> None:
        with source.open() as src, staging.open("wb") as dst:
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
    def _delete_source(source: Located, sha256: str) -> None:
        delete_verified_file(source, sha256)


def delete_verified_file(source: Located, sha256: str) -> None:
    """Delete ``source`` only while it still holds the scored bytes (gone already: done):
    the file hashed is the file unlinked, checked by inode just before."""
    if not source.exists():
        return
    with source.open() as handle:
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        hashed = os.fstat(handle.fileno())
    # A new upload took the name (different bytes, or a new file since the hash).
    changed = SourceChanged(f"{source.ref} now holds other bytes; not deleted")
    if digest.hexdigest() != sha256:
        raise changed
    if not source.unlink(hashed):
        raise changed
