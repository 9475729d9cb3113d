"""The Redis verdict cache and result store when their Redis dies, hangs and comes back.

A dead Redis must cost the worker one short failure, not a timeout per image: after a failure
the circuit breaker answers without touching the network. These tests count the connections
the client asks its pool for instead of timing anything, and drive the breaker's clock by hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer, free_port, redis_server_binary
from worker.cache import CachedEntry, RedisCache, RedisResultStore
from worker.cache.redis import redis_client
from worker.errors import CacheUnavailable

NS = "org/model@rev1/pp2/draft512"
SHA = "5" * 64
ENTRY = CachedEntry({"sfw": 0.05, "nsfw": 0.95}, 1, "c3a5f00f1e2d3c4b", "0f1e2d3c4b5a6978", True)
NEAR = "c3a5f00f1e2d3c4a"  # one bit away


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PoolCalls:
    """Counts the connections a client takes from its pool: every network call takes one."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        pool = client.connection_pool
        original = pool.get_connection

        def counted(*args: object, **kwargs: object) -> object:
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(pool, "get_connection", counted)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not on PATH")
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_client(server.url)
    yield client
    client.close()


def _cache_ops(cache: RedisCache) -> list[Callable[[], object]]:
    return [
        lambda: cache.get(NS, SHA),
        lambda: cache.put(NS, SHA, ENTRY),
        lambda: cache.near(NS, NEAR, None, 6),
    ]


def test_a_killed_redis_fails_fast_and_the_same_cache_recovers(
    server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    cache = RedisCache(client, "it", 60, clock=clock)
    calls = PoolCalls(client, monkeypatch)
    cache.put(NS, SHA, ENTRY)
    assert cache.get(NS, SHA) == ENTRY

    server.stop()
    with pytest.raises(CacheUnavailable) as failure:
        cache.get(NS, SHA)
    assert isinstance(failure.value.__cause__, redis.ConnectionError)
    assert failure.value.retryable
    tried = calls.count
    for op in _cache_ops(cache):
        with pytest.raises(CacheUnavailable, match="recent failure"):
            op()
    assert calls.count == tried, "the open breaker must not touch the network"

    server.start()
    with pytest.raises(CacheUnavailable):
        cache.get(NS, SHA)  # still cooling down, even though Redis is back
    assert calls.count == tried

    clock.advance(cache.breaker.cooldown_s)
    assert cache.get(NS, SHA) is None  # a fresh server: nothing was persisted
    cache.put(NS, SHA, ENTRY)
    assert cache.get(NS, SHA) == ENTRY
    assert [m.sha256 for m in cache.near(NS, NEAR, None, 6)] == [SHA]
    assert not cache.breaker.is_open


def test_after_the_cooldown_one_call_probes_a_still_dead_redis(
    server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    cache = RedisCache(client, "it", 60, clock=clock)
    calls = PoolCalls(client, monkeypatch)
    server.stop()
    with pytest.raises(CacheUnavailable):
        cache.get(NS, SHA)
    clock.advance(cache.breaker.cooldown_s)
    before = calls.count
    with pytest.raises(CacheUnavailable) as probe:
        cache.put(NS, SHA, ENTRY)
    assert isinstance(probe.value.__cause__, redis.RedisError)
    assert calls.count > before
    before = calls.count
    with pytest.raises(CacheUnavailable, match="recent failure"):
        cache.get(NS, SHA)
    assert calls.count == before


def test_a_hung_redis_times_out_into_cache_unavailable(
    server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    cache = RedisCache(client, "it", 60, clock=clock)
    cache.put(NS, SHA, ENTRY)
    calls = PoolCalls(client, monkeypatch)
    server.pause()
    try:
        with pytest.raises(CacheUnavailable) as failure:
            cache.get(NS, SHA)
        assert isinstance(failure.value.__cause__, redis.TimeoutError)
        tried = calls.count
        with pytest.raises(CacheUnavailable, match="recent failure"):
            cache.near(NS, NEAR, None, 6)
        assert calls.count == tried
    finally:
        server.resume()
    clock.advance(cache.breaker.cooldown_s)
    assert cache.get(NS, SHA) == ENTRY


def test_redis_killed_under_many_threads(server: RedisServer, client: redis.Redis) -> None:
    """Every call either works or raises CacheUnavailable; none hangs, nothing else escapes."""
    cache = RedisCache(client, "it", 60)
    cache.put(NS, SHA, ENTRY)
    started = threading.Barrier(9)
    stop = threading.Event()
    unexpected: list[BaseException] = []
    unavailable = [0]

    def work() -> None:
        started.wait()
        while not stop.is_set():
            for op in _cache_ops(cache):
                try:
                    op()
                except CacheUnavailable:
                    unavailable[0] += 1
                except BaseException as exc:
                    unexpected.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait()
    server.stop()
    for _ in range(1000):  # until many calls have met the dead server (10 s at most)
        if unavailable[0] >= 50:
            break
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert not unexpected
    assert unavailable[0] >= 50


def test_nothing_listening_is_unavailable_not_a_crash() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = RedisCache(url, "it", 60)  # building it touches no network: a worker starts anyway
    results = RedisResultStore(url, "it", 60)
    try:
        for op in [lambda: cache.get(NS, SHA), lambda: results.put_if_absent("r", "{}")]:
            with pytest.raises(CacheUnavailable):
                op()
    finally:
        cache.close()
        results.close()


def test_the_result_store_survives_a_restart(
    server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    store = RedisResultStore(client, "it", 60, clock=clock)
    calls = PoolCalls(client, monkeypatch)
    assert store.put_if_absent("req-1", '{"n": 1}') == '{"n": 1}'
    server.stop()
    for op in [lambda: store.get("req-1"), lambda: store.put_if_absent("req-1", '{"n": 2}')]:
        with pytest.raises(CacheUnavailable):
            op()
    tried = calls.count
    with pytest.raises(CacheUnavailable, match="recent failure"):
        store.get("req-1")
    assert calls.count == tried
    server.start()
    clock.advance(store.breaker.cooldown_s)
    assert store.put_if_absent("req-1", '{"n": 3}') == '{"n": 3}'
    assert store.get("req-1") == '{"n": 3}'
