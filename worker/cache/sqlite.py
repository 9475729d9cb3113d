"""The embedded verdict cache `modq scan` uses: one SQLite file, safe across threads."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from worker.cache.base import CachedEntry
from worker.errors import CacheUnavailable

__all__ = ["SQLiteCache"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    namespace TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    entry TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (namespace, sha256)
)
"""


class SQLiteCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise CacheUnavailable(f"cannot open the verdict cache {path}: {exc}") from exc

    def get(self, namespace: str, sha256: str) -> CachedEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT entry FROM verdicts WHERE namespace = ? AND sha256 = ?", (namespace, sha256)
            ).fetchone()
        return CachedEntry.from_json(row[0]) if row else None

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                (namespace, sha256, entry.to_json(), time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
