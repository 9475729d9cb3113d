"""The Redis verdict cache and result store: the contract every cache and store keeps
(tests/unit/test_cache_contract.py's suite, run here on Redis), what only Redis adds (its key
layout, expiry), and what happens when its Redis dies, hangs and comes back.

A dead Redis must cost the worker one short failure, not a timeout per image: after a failure
the circuit breaker answers without touching the network. These tests count the connections
the client asks its pool for instead of timing anything, and drive the breaker's clock by hand.
Every Redis here is a redis-server of this module's own on a free port; without redis-server
on PATH the tests fail, they never skip.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer, free_port
from tests.support.redis_trips import TripCounter
from tests.unit.test_cache_contract import (
    DHASH,
    LAYOUT,
    NS,
    PHASH,
    RADIUS,
    CacheContract,
    OpenCache,
    ResultStoreContract,
    entry,
    sha,
)
from worker.cache import CachedEntry, RedisCache, RedisResultStore, ResultStore, VerdictCache
from worker.errors import CacheUnavailable
from worker.hashing.phash_index import parse_hash
from worker.redisclient import redis_client

SHA = "5" * 64
ENTRY = CachedEntry({"sfw": 0.05, "nsfw": 0.95}, 1, "c3a5f00f1e2d3c4b", "0f1e2d3c4b5a6978", True)
NEAR = "c3a5f00f1e2d3c4a"  # one bit away


# --- the contract, on a server this module shares ---------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis-cache")) as server:
        yield server.url


@pytest.fixture
def redis_raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking behind the cache's back."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class TestRedisCacheContract(CacheContract):
    """The verdict cache contract on Redis, each test under a prefix of its own."""

    @pytest.fixture
    def open_cache(self, redis_url: str) -> Iterator[OpenCache]:
        prefix = _prefix()
        opened: list[RedisCache] = []

        def factory(radius: int = RADIUS, ttl_s: int = 60) -> VerdictCache:
            cache = RedisCache(redis_url, prefix, ttl_s, radius=radius)
            opened.append(cache)
            return cache

        yield factory
        for cache in opened:
            cache.close()

    @pytest.fixture
    def open_indexed(self, open_cache: OpenCache) -> OpenCache:
        return open_cache


class TestRedisResultStoreContract(ResultStoreContract):
    @pytest.fixture
    def results(self, redis_url: str) -> Iterator[ResultStore]:
        store = RedisResultStore(redis_url, _prefix(), 60)
        yield store
        store.close()


# --- what only Redis adds -----------------------------------------------------------------------


def _redis_cache(url: str, ttl_s: int = 60) -> RedisCache:
    return RedisCache(url, _prefix(), ttl_s, radius=RADIUS)


def test_redis_keys_stay_under_prefix_with_layout_and_ttl(
    redis_url: str, redis_raw: redis.Redis
) -> None:
    cache = _redis_cache(redis_url)
    try:
        cache.put(NS, sha(1), entry())
        cache.put(NS, sha(2), entry(informative=False))
        keys = sorted(redis_raw.keys(f"{cache.prefix}:*"))
        chunks = LAYOUT.chunks(parse_hash(PHASH))
        assert keys == sorted(
            [f"{cache.prefix}:v1:{NS}:sha:{sha(n)}" for n in (1, 2)]
            + [f"{cache.prefix}:v1:{NS}:mih7:{i}:{chunk}" for i, chunk in enumerate(chunks)]
        )
        assert all(0 < redis_raw.ttl(key) <= 60 for key in keys)
        assert redis_raw.smembers(f"{cache.prefix}:v1:{NS}:mih7:3:{chunks[3]}") == {sha(1)}
    finally:
        cache.close()


def test_redis_entries_and_index_expire(redis_url: str, redis_raw: redis.Redis) -> None:
    cache = _redis_cache(redis_url, ttl_s=1)
    try:
        cache.put(NS, sha(1), entry())
        assert cache.get(NS, sha(1)) == entry()
        time.sleep(1.1)
        assert cache.get(NS, sha(1)) is None
        assert cache.near(NS, PHASH, DHASH, RADIUS) == []
        assert redis_raw.keys(f"{cache.prefix}:*") == []
    finally:
        cache.close()


def test_redis_drops_members_whose_entry_expired(redis_url: str, redis_raw: redis.Redis) -> None:
    cache = _redis_cache(redis_url)
    try:
        cache.put(NS, sha(1), entry())
        cache.put(NS, sha(2), entry())
        redis_raw.delete(f"{cache.prefix}:v1:{NS}:sha:{sha(1)}")  # as if it expired
        assert [m.sha256 for m in cache.near(NS, PHASH, DHASH, RADIUS)] == [sha(2)]
        sets = redis_raw.keys(f"{cache.prefix}:v1:{NS}:mih7:*")
        assert len(sets) == LAYOUT.count
        assert all(redis_raw.smembers(key) == {sha(2)} for key in sets)
    finally:
        cache.close()


def _near_trips(cache: RedisCache, limit: int) -> tuple[list[str], int]:
    counter = TripCounter()
    with counter.counting():
        found = [m.sha256 for m in cache.near(NS, PHASH, DHASH, RADIUS, limit=limit)]
    return found, counter.count


def test_redis_near_reads_a_slice_of_candidates_in_one_round_trip(
    redis_url: str, redis_raw: redis.Redis
) -> None:
    cache = _redis_cache(redis_url)
    try:
        cache.near(NS, PHASH, DHASH, RADIUS)  # loads the script
        for n in (1, 2, 3):
            cache.put(NS, sha(n), entry())
        chunk = LAYOUT.chunks(parse_hash(PHASH))[0]
        redis_raw.sadd(f"{cache.prefix}:v1:{NS}:mih7:0:{chunk}", "not-a-sha256", sha(4))
        redis_raw.delete(f"{cache.prefix}:v1:{NS}:sha:{sha(2)}")  # as if it expired
        found, trips = _near_trips(cache, limit=10)
        assert found == [sha(1), sha(3)]
        assert trips == 2, "one to read the candidates, one to drop the expired"
        assert _near_trips(cache, limit=10) == ([sha(1), sha(3)], 1)
    finally:
        cache.close()


def test_redis_near_reads_more_candidates_than_a_slice_in_slices(redis_url: str) -> None:
    cache = _redis_cache(redis_url)
    try:
        count = 2 * 500 + 7  # three MGET slices
        for n in range(count):
            cache.put(NS, sha(n), entry())
        cache.near(NS, PHASH, DHASH, RADIUS)  # loads the script
        found, trips = _near_trips(cache, limit=count + 1)
        assert sorted(found) == sorted(sha(n) for n in range(count))
        assert trips == 2
        cache.max_candidates = 600
        found, _ = _near_trips(cache, limit=count + 1)
        assert found == sorted(sha(n) for n in range(count))[:600]
    finally:
        cache.close()


def test_redis_refuses_ambiguous_keys(redis_url: str) -> None:
    cache = _redis_cache(redis_url)
    try:
        for namespace in ("", "result", "result:x"):
            with pytest.raises(ValueError):
                cache.get(namespace, sha(1))
        for key in ("A" * 64, "a" * 63, "a" * 63 + ":"):
            with pytest.raises(ValueError):
                cache.put(NS, key, entry())
    finally:
        cache.close()


def test_redis_results_live_under_the_prefix_and_expire(
    redis_url: str, redis_raw: redis.Redis
) -> None:
    store = RedisResultStore(redis_url, _prefix(), 1)
    try:
        store.put_if_absent("req-1", "{}")
        assert redis_raw.keys(f"{store.prefix}:*") == [f"{store.prefix}:v1:result:req-1"]
        time.sleep(1.1)
        assert store.get("req-1") is None
        assert store.put_if_absent("req-1", '{"again": true}') == '{"again": true}'
    finally:
        store.close()


# --- Redis dead, hung and back ------------------------------------------------------------------


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
    """A server of this test's own, to kill and hang."""
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
