"""An in-memory store: the fake used by unit tests."""

from __future__ import annotations

from worker.errors import ImageTooLarge, ObjectNotFound

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})

    def read(self, ref: str, max_bytes: int) -> bytes:
        try:
            data = self.objects[ref]
        except KeyError as exc:
            raise ObjectNotFound(f"{ref} does not exist") from exc
        if len(data) > max_bytes:
            raise ImageTooLarge(f"{ref} is over the {max_bytes}-byte limit")
        return data
