"""Per-request leases and delivery counts, kept beside the stored results.

Two deliveries of one request can run at once: a redelivery while the first still works, the
pending sweep's re-send, a producer's retry, several workers sharing a queue. A delivery works
on a request only while it holds the request's lease: ``SET NX`` with a random token and a
short TTL, renewed by a thread while the holder works and released once its result is
published. Another delivery waits, then finds the stored result and re-publishes it; a holder
that died leaves a lease that expires within ``ttl_s``, and the next delivery takes over.

Delivery counts recognise a request whose processing kills the worker process (out of
memory, a native crash): every delivery that starts work counts one; one that ends in the
Python sense (published, retrying, failed) clears the count (``end``). A count left standing
is the number of deliveries whose process died holding the request.

A delivery comes for a request with one atomic step, ``start`` (in Redis one script, one
round trip): it reads the stored result and, only when there is none, takes the lease; a
fresh request (no count standing) is counted in the same step. A request with a count
standing is counted with ``begin`` once it runs alone (``worker.queue.service``), so one that
dies waiting for its turn is not blamed. A stored result whose action was left unfinished is
taken over with ``take_over``: the lease is taken beside the result, and nothing is counted.
So a delivery that holds the lease and found no result knows no result was stored before
it, and the re-delivery of a finished request never touches the lease.

Redis keys: ``{prefix}:v1:lease:{request_id}`` (the holder's token, ``ttl_s``) and
``{prefix}:v1:deliveries:{request_id}`` (the count, ``count_ttl_s``), beside the result
store's ``{prefix}:v1:result:{request_id}``, whose prefix and client they share.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.cache.results import RedisResultStore, ResultStore
from worker.errors import CacheUnavailable
from worker.log import get_logger
from worker.redisclient import DEFAULT_BREAKER_S, CircuitBreaker

__all__ = ["LeaseKeeper", "LeaseStore", "MemoryLeases", "RedisLeases", "Turn"]

log = get_logger(__name__)

# KEYS: lease, deliveries, counted-by, result; ARGV: token, lease TTL (ms), count TTL (s),
# take over (1/0). Answers {stored result or nil, 1 when the lease was taken else 0, standing
# count}. Sent again under the same token (the client re-sends a call whose reply was lost),
# it answers what the first call did: the lease is this token's, and a count this token set
# is not standing.
_START = """
local stored = redis.call('GET', KEYS[4])
if redis.call('GET', KEYS[1]) == ARGV[1] then
    local standing = tonumber(redis.call('GET', KEYS[2]) or '0')
    if redis.call('GET', KEYS[3]) == ARGV[1] then
        standing = standing - 1
    end
    return {stored, 1, standing}
end
if stored and ARGV[4] ~= '1' then
    return {stored, 0, 0}
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {stored, 0, 0}
end
local standing = tonumber(redis.call('GET', KEYS[2]) or '0')
if not stored and standing == 0 then
    redis.call('SET', KEYS[2], 1, 'EX', ARGV[3])
    redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
end
return {stored, 1, standing}
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
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
elseif not holder then
    redis.call('DEL', KEYS[2], KEYS[3])
end
return 1
"""


@dataclass(frozen=True)
class Turn:
    """What a delivery found when it came for a request (``LeaseStore.start``)."""

    #: the stored result's JSON, if any
    stored: str | None = None
    #: the lease's token when this delivery took it; None when it did not (a stored result,
    #: or another delivery holds the lease)
    token: str | None = None
    #: deliveries before this one whose process died holding the request (when it took the lease)
    standing: int = 0

    @property
    def counted(self) -> bool:
        """``start`` counted this delivery: it took the lease of a fresh request."""
        return self.token is not None and self.stored is None and not self.standing


class LeaseStore(Protocol):
    def start(self, request_id: str, token: str, ttl_s: float, *, take_over: bool = False) -> Turn:
        """In one atomic step: the stored result, and unless there is one (or ``take_over``)
        the lease under ``token``, free or expired. A delivery that takes the lease of a
        fresh request (no result, no count standing) starts work and is counted."""

    def renew(self, request_id: str, token: str, ttl_s: float) -> bool:
        """Extend a lease still held under ``token``."""

    def begin(self, request_id: str) -> int:
        """Count one more delivery that starts work (one ``start`` did not count); returns
        the count."""

    def end(self, request_id: str, token: str) -> None:
        """The delivery ended without its process dying: free the lease and clear the count,
        unless another delivery has taken the lease over since."""


class MemoryLeases:
    """The fake: one process's leases and counts beside ``results``, expiring by ``clock``."""

    def __init__(self, results: ResultStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.results = results
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[str, float]] = {}
        self._counts: dict[str, int] = {}
        #: the token whose start set a request's count
        self._counted: dict[str, str] = {}

    def start(self, request_id: str, token: str, ttl_s: float, *, take_over: bool = False) -> Turn:
        with self._lock:
            # Results are stored before leases are released, so under this lock a free lease
            # means every result stored by an earlier holder is visible.
            stored = self.results.get(request_id)
            if stored is not None and not take_over:
                return Turn(stored)
            held = self._leases.get(request_id)
            live = held is not None and held[1] > self._clock()
            if live and held is not None and held[0] == token:  # the same call, sent again
                ours = self._counted.get(request_id) == token
                return Turn(stored, token, self._counts.get(request_id, 0) - ours)
            if live:
                return Turn(stored)
            self._leases[request_id] = (token, self._clock() + ttl_s)
            turn = Turn(stored, token, self._counts.get(request_id, 0))
            if turn.counted:
                self._counts[request_id] = 1
                self._counted[request_id] = token
            return turn

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
                self._counted.pop(request_id, None)
            elif not live:
                self._counts.pop(request_id, None)
                self._counted.pop(request_id, None)


class RedisLeases:
    def __init__(
        self, results: RedisResultStore, count_ttl_s: int, *, breaker_s: float = DEFAULT_BREAKER_S
    ) -> None:
        """Leases beside ``results``, on its client and under its prefix; ``count_ttl_s``: how
        long a standing delivery count is remembered."""
        if count_ttl_s < 1:
            raise ValueError("leases need a count TTL of 1 s or more")
        self.results = results
        self.prefix = results.prefix
        self.count_ttl_s = count_ttl_s
        self.client = results.client
        self.breaker = CircuitBreaker("lease store (redis)", breaker_s)
        self._start = self.client.register_script(_START)
        self._renew = self.client.register_script(_RENEW)
        self._end = self.client.register_script(_END)

    def _keys(self, request_id: str) -> list[str]:
        if not request_id:
            raise ValueError("a lease needs a non-empty request id")
        base = f"{self.prefix}:v1:"
        return [
            f"{base}lease:{request_id}",
            f"{base}deliveries:{request_id}",
            f"{base}counted:{request_id}",
        ]

    def start(self, request_id: str, token: str, ttl_s: float, *, take_over: bool = False) -> Turn:
        keys = [*self._keys(request_id), self.results.key(request_id)]
        args: list[str | int] = [token, max(1, int(ttl_s * 1000)), self.count_ttl_s, int(take_over)]
        stored, taken, standing = self.breaker.call("start", lambda: self._start(keys, args))
        stored = None if stored is None else _text(stored)
        return Turn(stored, token, int(standing)) if taken else Turn(stored)

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


class LeaseKeeper:
    """Starts deliveries with fresh tokens and renews every lease this process holds from one
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

    def start(self, request_id: str, *, take_over: bool = False) -> Turn:
        """``LeaseStore.start`` under a fresh token; a lease taken is renewed until released."""
        turn = self.store.start(request_id, secrets.token_hex(16), self.ttl_s, take_over=take_over)
        if turn.token is None:
            return turn
        with self._lock:
            self._held[request_id] = turn.token
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renew_loop, name="modq-leases", daemon=True
                )
                self._thread.start()
        return turn

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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
