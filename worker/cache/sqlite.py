"""The embedded verdict cache `modq scan` uses: one SQLite file, safe across threads.

The perceptual tier is the same multi-index hashing as in Redis, held in a table: a scan of a
large folder asks ``near`` for every image, so a brute-force pass over the namespace would make
a scan quadratic. Entries never expire here; the file is the scan's own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from worker.cache.base import CachedEntry, NearMatch, check_radius, indexable_phash, rank_near
from worker.errors import CacheUnavailable
from worker.hashing.phash_index import DEFAULT_RADIUS, layout_for, parse_hash, probes

__all__ = ["SQLiteCache"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    namespace TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    entry TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (namespace, sha256)
);
CREATE TABLE IF NOT EXISTS perceptual (
    namespace TEXT NOT NULL,
    layout TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    value TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (namespace, layout, chunk, value, sha256)
) WITHOUT ROWID;
"""

_CHUNK_MEMBERS = (
    "SELECT sha256 FROM perceptual WHERE namespace = ? AND layout = ? AND chunk = ? AND value IN "
)


class SQLiteCache:
    def __init__(self, path: Path, radius: int = DEFAULT_RADIUS) -> None:
        self.layout = layout_for(radius)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise CacheUnavailable(f"cannot open the verdict cache {path}: {exc}") from exc

    @property
    def radius(self) -> int:
        return self.layout.radius

    @contextmanager
    def _locked(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise CacheUnavailable(f"verdict cache {self.path} {what} failed: {exc}") from exc

    def get(self, namespace: str, sha256: str) -> CachedEntry | None:
        with self._locked("get") as db:
            row = db.execute(
                "SELECT entry FROM verdicts WHERE namespace = ? AND sha256 = ?", (namespace, sha256)
            ).fetchone()
        return CachedEntry.from_json(row[0]) if row else None

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None:
        value = indexable_phash(entry)
        chunks = [] if value is None else list(enumerate(self.layout.chunks(value)))
        with self._locked("put") as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                    (namespace, sha256, entry.to_json(), time.time()),
                )
                db.executemany(
                    "INSERT OR IGNORE INTO perceptual VALUES (?, ?, ?, ?, ?)",
                    [(namespace, self.layout.tag, i, chunk, sha256) for i, chunk in chunks],
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def near(
        self, namespace: str, phash: str, dhash: str | None, radius: int, limit: int = 8
    ) -> list[NearMatch]:
        check_radius(radius)
        members, params = self._members_query(namespace, parse_hash(phash), radius)
        if dhash is not None:
            parse_hash(dhash)
        if limit <= 0:
            return []
        with self._locked("near") as db:
            rows = db.execute(
                f"SELECT sha256, entry FROM verdicts WHERE namespace = ? AND sha256 IN ({members})",
                [namespace, *params],
            ).fetchall()
        candidates = [(sha256, CachedEntry.from_json(text)) for sha256, text in rows]
        return rank_near(candidates, phash, dhash, radius, limit)

    def _members_query(
        self, namespace: str, phash: int, radius: int
    ) -> tuple[str, list[str | int]]:
        """One indexed SELECT per chunk (at most 64, under SQLite's compound-select limit)."""
        by_chunk: dict[int, list[str]] = {}
        for i, chunk in probes(self.layout, phash, radius):
            by_chunk.setdefault(i, []).append(chunk)
        selects: list[str] = []
        params: list[str | int] = []
        for i, chunks in by_chunk.items():
            selects.append(_CHUNK_MEMBERS + "(" + ", ".join("?" * len(chunks)) + ")")
            params += [namespace, self.layout.tag, i, *chunks]
        return " UNION ".join(selects), params

    def close(self) -> None:
        with self._lock:
            self._db.close()
