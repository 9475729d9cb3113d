"""The cache seam and its in-memory fake."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from typing import Protocol

__all__ = ["CachedEntry", "MemoryCache", "VerdictCache"]


@dataclass(frozen=True)
class CachedEntry:
    """What a classification leaves behind: per-label probabilities (of the worst frame)
    and the perceptual hashes, so a hit needs no decode at all."""

    probabilities: dict[str, float]
    frames: int = 1
    phash: str | None = None
    dhash: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CachedEntry:
        return cls(**json.loads(text))


class VerdictCache(Protocol):
    """Keyed by (namespace, sha256): the namespace carries model id, revision and the
    preprocessing version, so entries from other weights or preprocessing never match."""

    def get(self, namespace: str, sha256: str) -> CachedEntry | None: ...

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None: ...


class MemoryCache:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], CachedEntry] = {}
        self._lock = threading.Lock()

    def get(self, namespace: str, sha256: str) -> CachedEntry | None:
        with self._lock:
            return self._entries.get((namespace, sha256))

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None:
        with self._lock:
            self._entries[(namespace, sha256)] = entry

    def __len__(self) -> int:
        return len(self._entries)
