"""Embeddings kept on disk between fine-tuning runs.

Extracting embeddings is nearly all of a head fine-tune's time; trying another label set,
seed or learning rate on the same images should not pay it again. Entries are keyed by the
model's cache namespace (id, revision, preprocessing version), the decode mode and the
sha256 of the file's bytes, so other weights or other pixels never share an entry.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["EmbeddingCache"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    namespace TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (namespace, sha256)
)
"""


class EmbeddingCache:
    """A SQLite table of float32 vectors; used from one thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute(_SCHEMA)
        self._db.commit()

    def digests(self, namespace: str) -> set[str]:
        rows = self._db.execute("SELECT sha256 FROM embeddings WHERE namespace = ?", (namespace,))
        return {digest for (digest,) in rows}

    def get_many(self, namespace: str, digests: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(digests))
        found: dict[str, np.ndarray] = {}
        # SQLite caps bound parameters per statement; 500 stays well below every build's cap.
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = (
                f"SELECT sha256, vector FROM embeddings WHERE namespace = ? AND sha256 IN ({marks})"
            )
            rows = self._db.execute(query, [namespace, *chunk])
            for digest, blob in rows:
                found[digest] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put_many(self, namespace: str, items: Iterable[tuple[str, np.ndarray]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO embeddings (namespace, sha256, vector) VALUES (?, ?, ?)",
            [(namespace, digest, np.asarray(v, dtype=np.float32).tobytes()) for digest, v in items],
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()
