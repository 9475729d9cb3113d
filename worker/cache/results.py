"""Stored results, so that a re-delivered request re-publishes the same result.

Delivery is at least once: a request can arrive again after it finished (the worker died
between publishing and acking, or the broker re-delivered it). The first delivery to finish
stores its result under the request id, only if none is there yet; a later delivery gets the
stored result back and publishes that, never a second, possibly different, one.

Redis key: ``{prefix}:v1:result:{request_id}``, kept ``result_ttl_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from worker.config import CacheSettings
from worker.errors import ConfigError
from worker.redisclient import (
    DEFAULT_BREAKER_S,
    DEFAULT_TIMEOUT_S,
    CircuitBreaker,
    redis_client,
)

__all__ = ["MemoryResultStore", "RedisResultStore", "ResultStore"]


class ResultStore(Protocol):
    def get(self, request_id: str) -> str | None:
        """The stored result JSON of ``request_id``, if any."""

    def put_if_absent(self, request_id: str, result_json: str) -> str:
        """Store ``result_json`` unless a result is stored already; return the stored one."""

    def replace(self, request_id: str, result_json: str) -> None:
        """Overwrite the stored result (the same verdict, once its action is done)."""


def _check_request_id(request_id: str) -> None:
    if not request_id:
        raise ValueError("a stored result needs a non-empty request id")


class MemoryResultStore:
    """The fake; results never expire."""

    def __init__(self) -> None:
        self._results: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, request_id: str) -> str | None:
        _check_request_id(request_id)
        with self._lock:
            return self._results.get(request_id)

    def put_if_absent(self, request_id: str, result_json: str) -> str:
        _check_request_id(request_id)
        with self._lock:
            return self._results.setdefault(request_id, result_json)

    def replace(self, request_id: str, result_json: str) -> None:
        _check_request_id(request_id)
        with self._lock:
            self._results[request_id] = result_json


class RedisResultStore:
    def __init__(
        self,
        client: redis.Redis | str,
        prefix: str,
        ttl_s: int,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        breaker_s: float = DEFAULT_BREAKER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``client``: a URL (the store then owns and closes its client) or a shared client."""
        if not prefix or ttl_s < 1:
            raise ValueError("the result store needs a non-empty prefix and a TTL of 1 s or more")
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._owns_client = isinstance(client, str)
        self.client = redis_client(client, timeout_s) if isinstance(client, str) else client
        self.breaker = CircuitBreaker("result store (redis)", breaker_s, clock)

    @classmethod
    def from_settings(
        cls, cache: CacheSettings, client: redis.Redis | None = None
    ) -> RedisResultStore:
        target = client if client is not None else cache.url
        if target is None:
            raise ConfigError("MODQ_CACHE_URL is empty, so there is no Redis result store")
        return cls(target, cache.prefix, cache.result_ttl_s)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def key(self, request_id: str) -> str:
        """The Redis key of ``request_id``'s result (the leases read it beside theirs)."""
        _check_request_id(request_id)
        return f"{self.prefix}:v1:result:{request_id}"

    def get(self, request_id: str) -> str | None:
        key = self.key(request_id)
        value = self.breaker.call("get", lambda: self.client.get(key))
        return None if value is None else _text(value)

    def put_if_absent(self, request_id: str, result_json: str) -> str:
        key = self.key(request_id)

        def store() -> object:
            # SET NX then GET in one MULTI: atomic and one round trip on any Redis version
            # (SET ... NX GET needs Redis 7).
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, result_json, nx=True, ex=self.ttl_s)
                pipe.get(key)
                _, stored = pipe.execute()
            return stored

        stored = self.breaker.call("put", store)
        return result_json if stored is None else _text(stored)

    def replace(self, request_id: str, result_json: str) -> None:
        key = self.key(request_id)
        self.breaker.call("replace", lambda: self.client.set(key, result_json, ex=self.ttl_s))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
