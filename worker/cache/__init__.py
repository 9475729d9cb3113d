"""Verdict caches and stored results. Scores are cached, not verdicts, so a new threshold
needs no flush. One contract (``VerdictCache``), three implementations: the in-memory fake,
SQLite for ``modq scan`` and Redis for the queue worker."""

from worker.cache.base import (
    CachedEntry,
    MemoryCache,
    NearMatch,
    VerdictCache,
    choose_near_match,
)
from worker.cache.redis import RedisCache
from worker.cache.results import MemoryResultStore, RedisResultStore, ResultStore
from worker.cache.sqlite import SQLiteCache

__all__ = [
    "CachedEntry",
    "MemoryCache",
    "MemoryResultStore",
    "NearMatch",
    "RedisCache",
    "RedisResultStore",
    "ResultStore",
    "SQLiteCache",
    "VerdictCache",
    "choose_near_match",
]
