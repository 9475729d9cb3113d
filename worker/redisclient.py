"""Every Redis client modq opens comes from here: for its own keys (verdict cache, results,
leases, hash banks), the producers' record of requests and the stream callbacks. Pooled, so
thread-safe, and quick to give up: one immediate retry when a connection drops (the server
restarted), none when it times out (the server hangs). ``CircuitBreaker`` turns what still
fails into ``CacheUnavailable`` and keeps a down server from slowing every request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import CacheUnavailable

__all__ = ["DEFAULT_BREAKER_S", "DEFAULT_TIMEOUT_S", "CircuitBreaker", "redis_client"]

T = TypeVar("T")

#: how long a call on modq's own keys may take before the server counts as hung
DEFAULT_TIMEOUT_S = 0.25
#: how long a breaker fails fast after a failure before one call probes again
DEFAULT_BREAKER_S = 2.0


def redis_client(
    url: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    decode_responses: bool = True,
    health_check_s: int = 0,
) -> redis.Redis:
    """A pooled client for ``url``; it connects on its first command, not here."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        decode_responses=decode_responses,
        health_check_interval=health_check_s,
    )


class CircuitBreaker:
    """Turns Redis failures into ``CacheUnavailable`` and, for ``cooldown_s`` after one,
    fails every call at once. Then a single call probes while the others keep failing fast;
    its success closes the breaker."""

    def __init__(
        self,
        name: str,
        cooldown_s: float = DEFAULT_BREAKER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until: float | None = None  # None: closed

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None and self._clock() < self._open_until

    def call(self, what: str, action: Callable[[], T]) -> T:
        self._admit(what)
        try:
            result = action()
        except (redis.RedisError, OSError) as exc:
            self._trip()
            raise CacheUnavailable(f"{self.name} {what} failed: {exc}") from exc
        if self._open_until is not None:
            self._close()
        return result

    def _admit(self, what: str) -> None:
        with self._lock:
            if self._open_until is None:
                return
            now = self._clock()
            if now < self._open_until:
                wait_s = self._open_until - now
                raise CacheUnavailable(
                    f"{self.name} unavailable after a recent failure; {what} skipped "
                    f"(next try in {wait_s:.1f}s)"
                )
            self._open_until = now + self.cooldown_s  # this call probes, the rest fail fast

    def _trip(self) -> None:
        with self._lock:
            self._open_until = self._clock() + self.cooldown_s

    def _close(self) -> None:
        with self._lock:
            self._open_until = None
