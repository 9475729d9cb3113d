"""Local files, confined to allowed roots (no ``..`` or symlink escapes)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from worker.errors import ForbiddenReference, ImageTooLarge, ObjectNotFound, StorageUnavailable
from worker.storage.base import ref_to_path

__all__ = ["LocalStore"]


class LocalStore:
    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)

    def confine(self, ref: str) -> Path:
        """The real path behind ``ref``, refused unless it lies under an allowed root."""
        path = ref_to_path(ref)
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in self.roots):
            raise ForbiddenReference(f"{ref} is outside the allowed roots")
        return real

    def read(self, ref: str, max_bytes: int) -> bytes:
        real = self.confine(ref)
        try:
            # O_NOFOLLOW: a symlink swapped in after the check above is refused, not followed.
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(max_bytes + 1)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{ref} does not exist") from exc
        except IsADirectoryError as exc:
            raise ObjectNotFound(f"{ref} is a directory") from exc
        except PermissionError as exc:
            raise ForbiddenReference(f"{ref}: permission denied") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ForbiddenReference(f"{ref} changed into a symlink while being read") from exc
            raise StorageUnavailable(f"cannot read {ref}: {exc}") from exc
        if len(data) > max_bytes:
            raise ImageTooLarge(f"{ref} is over the {max_bytes}-byte limit")
        return data
