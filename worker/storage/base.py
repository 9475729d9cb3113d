"""The storage seam: read the bytes behind a reference, within a byte cap."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from worker.errors import InvalidReference

__all__ = ["ObjectStore", "file_ref", "ref_to_path"]


class ObjectStore(Protocol):
    def read(self, ref: str, max_bytes: int) -> bytes:
        """The object's bytes; ``ImageTooLarge`` past ``max_bytes`` (checked while reading)."""
        ...


def file_ref(path: Path) -> str:
    return "file://" + quote(str(path.absolute()))


def ref_to_path(ref: str) -> Path:
    parts = urlsplit(ref)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise InvalidReference(f"not a local file reference: {ref!r}")
    return Path(unquote(parts.path))
