"""Redis clients for modq's own keys (verdict cache, results, hash banks): pooled, so
thread-safe, and quick to give up: one immediate retry when a connection drops (the server
restarted), none when it times out (the server hangs). The callers wrap what still fails
into their own retryable errors."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["redis_client"]


def redis_client(url: str, timeout_s: float, *, decode_responses: bool = True) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        decode_responses=decode_responses,
    )
