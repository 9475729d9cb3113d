"""Per-request leases and delivery counts, kept beside the stored results.

Two deliveries of one request can run at once: a redelivery while the first still works, the
pending sweep's re-send, a producer's retry, several workers sharing a queue. A delivery works
on a request only while it holds the request's lease: ``SET NX`` with a random token and a
short TTL, renewed by a thread while the holder works and released once its result is
published. Another delivery waits, then finds the stored result and re-publishes it; a holder
that died leaves a lease that expires within ``ttl_s``, and the next delivery takes over.

Delivery counts recognise a request whose processing kills the worker process (out of
memory, a native crash): every delivery that starts work counts one (``begin``); one that ends
in the Python sense (published, retrying, failed) clears the count (``end``). A count left
standing is the number of deliveries whose process died holding the request.

Redis keys: ``{prefix}:v1:lease:{request_id}`` (the holder's token, ``ttl_s``) and
``{prefix}:v1:deliveries:{request_id}`` (the count, ``count_ttl_s``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from worker.errors import CacheUnavailable
from worker.log import get_logger
from worker.redisclient import DEFAULT_BREAKER_S, DEFAULT_TIMEOUT_S, CircuitBreaker, redis_client

__all__ = ["LeaseKeeper", "LeaseStore", "MemoryLeases", "RedisLeases"]

log = get_logger(__name__)

# Take the lease if it is free; either way answer the standing delivery count (-1: taken).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return -1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# A lease taken over by another delivery keeps that delivery's count.
_END = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[2])
elseif not holder then
    redis.call('DEL', KEYS[2])
end
return 1
"""


class LeaseStore(Protocol):
    def acquire(self, request_id: str, token: str, ttl_s: float) -> int | None:
        """Take the lease; ``None`` when another holds it, else the standing delivery count."""

    def renew(self, request_id: str, token: str, ttl_s: float) -> bool:
        """Extend a lease still held under ``token``."""

    def begin(self, request_id: str) -> int:
        """Count one more delivery that starts work; returns the count."""

    def end(self, request_id: str, token: str) -> None:
        """The delivery ended without its process dying: free the lease and clear the count,
        unless another delivery has taken the lease over since."""


class MemoryLeases:
    """The fake: one process's leases and counts, expiring by ``clock``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[str, float]] = {}
        self._counts: dict[str, int] = {}

    def acquire(self, request_id: str, token: str, ttl_s: float) -> int | None:
        with self._lock:
            held = self._leases.get(request_id)
            if held is not None and held[1] > self._clock():
                return None
            self._leases[request_id] = (token, self._clock() + ttl_s)
            return self._counts.get(request_id, 0)

    def renew(self, request_id: str, token: str, ttl_s: float) -> bool:
        with self._lock:
            held = self._leases.get(request_id)
            if held is None or held[0] != token or held[1] <= self._clock():
                return False
            self._leases[request_id] = (token, self._clock() + ttl_s)
            return True

    def begin(self, request_id: str) -> int:
        with self._lock:
            self._counts[request_id] = self._counts.get(request_id, 0) + 1
            return self._counts[request_id]

    def end(self, request_id: str, token: str) -> None:
        with self._lock:
            held = self._leases.get(request_id)
            live = held is not None and held[1] > self._clock()
            if held is not None and held[0] == token:
                del self._leases[request_id]
                self._counts.pop(request_id, None)
            elif not live:
                self._counts.pop(request_id, None)


class RedisLeases:
    def __init__(
        self,
        client: redis.Redis | str,
        prefix: str,
        count_ttl_s: int,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        breaker_s: float = DEFAULT_BREAKER_S,
    ) -> None:
        """``client``: a URL (the store then owns and closes its client) or a shared client;
        ``count_ttl_s``: how long a standing delivery count is remembered."""
        if not prefix or count_ttl_s < 1:
            raise ValueError("leases need a non-empty prefix and a count TTL of 1 s or more")
        self.prefix = prefix
        self.count_ttl_s = count_ttl_s
        self._owns_client = isinstance(client, str)
        self.client = redis_client(client, timeout_s) if isinstance(client, str) else client
        self.breaker = CircuitBreaker("lease store (redis)", breaker_s)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        self._end = self.client.register_script(_END)

    def _keys(self, request_id: str) -> list[str]:
        if not request_id:
            raise ValueError("a lease needs a non-empty request id")
        base = f"{self.prefix}:v1:"
        return [f"{base}lease:{request_id}", f"{base}deliveries:{request_id}"]

    def acquire(self, request_id: str, token: str, ttl_s: float) -> int | None:
        keys, ttl_ms = self._keys(request_id), max(1, int(ttl_s * 1000))
        count = self.breaker.call("acquire", lambda: self._acquire(keys, [token, ttl_ms]))
        return None if int(count) < 0 else int(count)

    def renew(self, request_id: str, token: str, ttl_s: float) -> bool:
        keys, ttl_ms = self._keys(request_id), max(1, int(ttl_s * 1000))
        return bool(self.breaker.call("renew", lambda: self._renew(keys, [token, ttl_ms])))

    def begin(self, request_id: str) -> int:
        key = self._keys(request_id)[1]

        def count() -> object:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.count_ttl_s)
                value, _ = pipe.execute()
            return value

        value = self.breaker.call("begin", count)
        return int(value) if isinstance(value, int | str) else 0

    def end(self, request_id: str, token: str) -> None:
        keys = self._keys(request_id)
        self.breaker.call("end", lambda: self._end(keys, [token]))

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


class LeaseKeeper:
    """Takes leases with fresh tokens and renews every lease this process holds from one
    thread, every third of the TTL, until it is released. A release that cannot reach Redis
    is tried again by the same thread: a delivery that ended must not stay counted as one
    whose process died."""

    def __init__(self, store: LeaseStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._held: dict[str, str] = {}
        self._unended: dict[tuple[str, str], None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, request_id: str) -> tuple[str, int] | None:
        """``(token, standing delivery count)``, or ``None`` while another delivery holds it."""
        token = secrets.token_hex(16)
        count = self.store.acquire(request_id, token, self.ttl_s)
        if count is None:
            return None
        with self._lock:
            self._held[request_id] = token
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renew_loop, name="modq-leases", daemon=True
                )
                self._thread.start()
        return token, count

    def release(self, request_id: str, token: str) -> None:
        with self._lock:
            if self._held.get(request_id) == token:
                del self._held[request_id]
        try:
            self.store.end(request_id, token)
        except CacheUnavailable as exc:
            log.warning("lease release deferred", request_id=request_id, error=str(exc))
            with self._lock:
                self._unended[(request_id, token)] = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                held = list(self._held.items())
                unended = list(self._unended)
            for request_id, token in unended:
                try:
                    self.store.end(request_id, token)
                except Exception:
                    continue
                with self._lock:
                    self._unended.pop((request_id, token), None)
            for request_id, token in held:
                try:
                    if not self.store.renew(request_id, token, self.ttl_s):
                        log.warning("lease lost while working", request_id=request_id)
                except Exception as exc:  # a renewal failure must never end the thread
                    log.warning("lease not renewed", request_id=request_id, error=str(exc))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
