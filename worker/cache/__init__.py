"""Verdict caches. Scores are cached, not verdicts, so a new threshold needs no flush."""

from worker.cache.base import CachedEntry, MemoryCache, VerdictCache
from worker.cache.sqlite import SQLiteCache

__all__ = ["CachedEntry", "MemoryCache", "SQLiteCache", "VerdictCache"]
