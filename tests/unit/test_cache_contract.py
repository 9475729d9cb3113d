"""The contract every verdict cache keeps (memory, SQLite, Redis), what a perceptual match
may lend (block only), and the result store (memory, Redis).

The Redis cases run against a real redis-server this module starts on a free port.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer, redis_server_binary
from worker.cache import (
    CachedEntry,
    MemoryCache,
    MemoryResultStore,
    NearMatch,
    RedisCache,
    RedisResultStore,
    ResultStore,
    SQLiteCache,
    VerdictCache,
    choose_near_match,
)
from worker.cache.mih import MAX_PROBES, ChunkLayout, hamming, parse_hash, probes

RADIUS = 6
LAYOUT = ChunkLayout.for_radius(RADIUS)
STARTS = [sum(LAYOUT.widths[:i]) for i in range(LAYOUT.count)]  # first bit of each chunk
NS = "org/model@rev1/pp2/draft512"
NS_OTHER = "org:model@rev2/pp2/exact"  # ':' and '/' are both fine in a namespace
PHASH = "c3a5f00f1e2d3c4b"
DHASH = "0f1e2d3c4b5a6978"


def _sha(n: int) -> str:
    return f"{n:064x}"


def _flip(hex_hash: str, positions: list[int]) -> str:
    """Flip bits, counted from the most significant (position 0)."""
    value = parse_hash(hex_hash)
    for position in positions:
        value ^= 1 << (63 - position)
    return f"{value:016x}"


def _entry(
    phash: str | None = PHASH,
    dhash: str | None = DHASH,
    nsfw: float = 0.9,
    informative: bool = True,
) -> CachedEntry:
    return CachedEntry({"sfw": 1.0 - nsfw, "nsfw": nsfw}, 1, phash, dhash, informative)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not on PATH")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking behind the cache's back."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


OpenCache = Callable[..., VerdictCache]


def _opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenCache]:
    """Opens the same backing cache (one memory dict, one file, one prefix) on every call;
    ``radius`` is the one it indexes for."""
    kind = request.param
    closers: list[Callable[[], None]] = []
    memory = MemoryCache()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    url = request.getfixturevalue("redis_url") if kind == "redis" else ""

    def factory(radius: int = RADIUS, ttl_s: int = 60) -> VerdictCache:
        if kind == "memory":
            return memory
        if kind == "sqlite":
            lite = SQLiteCache(tmp_path / "verdicts.sqlite3", radius=radius)
            closers.append(lite.close)
            return lite
        cache = RedisCache(url, prefix, ttl_s, radius=radius)
        closers.append(cache.close)
        return cache

    yield factory
    for close in closers:
        close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenCache]:
    yield from _opener(request, tmp_path)


@pytest.fixture(params=["sqlite", "redis"])
def open_indexed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenCache]:
    """The caches that keep a chunk index (the memory fake searches by brute force)."""
    yield from _opener(request, tmp_path)


@pytest.fixture
def cache(open_cache: OpenCache) -> VerdictCache:
    return open_cache()


# --- exact tier -----------------------------------------------------------------------------


def test_get_misses_then_round_trips_every_field(cache: VerdictCache) -> None:
    assert cache.get(NS, _sha(1)) is None
    entry = CachedEntry({"neutral": 0.25, "porn": 0.75}, 4, PHASH, DHASH, True)
    cache.put(NS, _sha(1), entry)
    assert cache.get(NS, _sha(1)) == entry
    assert cache.get(NS, _sha(2)) is None


def test_put_replaces(cache: VerdictCache) -> None:
    cache.put(NS, _sha(1), _entry(nsfw=0.1))
    cache.put(NS, _sha(1), _entry(nsfw=0.8, informative=False))
    assert cache.get(NS, _sha(1)) == _entry(nsfw=0.8, informative=False)


def test_namespaces_are_isolated_in_both_tiers(cache: VerdictCache) -> None:
    cache.put(NS, _sha(1), _entry(nsfw=0.1))
    assert cache.get(NS_OTHER, _sha(1)) is None
    assert cache.near(NS_OTHER, PHASH, DHASH, RADIUS) == []
    cache.put(NS_OTHER, _sha(1), _entry(nsfw=0.7))
    assert cache.get(NS, _sha(1)) == _entry(nsfw=0.1)
    [match] = cache.near(NS, PHASH, DHASH, RADIUS)
    assert match.entry == _entry(nsfw=0.1)


def test_old_rows_without_newer_fields_still_read() -> None:
    old = '{"dhash": null, "frames": 2, "phash": "c3a5f00f1e2d3c4b", "probabilities": {"a": 1.0}}'
    entry = CachedEntry.from_json(old)
    assert entry == CachedEntry({"a": 1.0}, 2, PHASH, None, informative=False)
    newer = entry.to_json().replace('"frames"', '"from_the_future": 1, "frames"')
    assert CachedEntry.from_json(newer) == entry


# --- perceptual tier ------------------------------------------------------------------------


def test_near_finds_the_same_hash_at_distance_zero(cache: VerdictCache) -> None:
    cache.put(NS, _sha(1), _entry())
    assert cache.near(NS, PHASH, DHASH, RADIUS) == [NearMatch(_sha(1), _entry(), 0, 0)]


SPREADS = {
    # r flipped bits in r different chunks: one chunk still agrees (the pigeonhole case)
    "one-per-chunk": [STARTS[i] for i in range(RADIUS + 1)],
    "chunk-ends": [STARTS[i] + LAYOUT.widths[i] - 1 for i in range(RADIUS + 1)],
    # all flips in one or two chunks
    "clustered": [*range(STARTS[2], STARTS[2] + 5), STARTS[5], STARTS[5] + 1],
    "random": random.Random(7).sample(range(64), RADIUS + 1),
}


@pytest.mark.parametrize("spread", SPREADS)
def test_near_finds_radius_and_not_radius_plus_one(cache: VerdictCache, spread: str) -> None:
    positions = SPREADS[spread]
    at_radius, past_radius = _flip(PHASH, positions[:RADIUS]), _flip(PHASH, positions)
    cache.put(NS, _sha(1), _entry(at_radius))
    cache.put(NS, _sha(2), _entry(past_radius))
    [match] = cache.near(NS, PHASH, None, RADIUS)
    assert (match.sha256, match.phash_distance) == (_sha(1), RADIUS)
    # it was indexed all right: from its own hash it is at 0, and the other one at 1
    assert [m.sha256 for m in cache.near(NS, past_radius, None, RADIUS)] == [_sha(2), _sha(1)]


def test_every_chunk_alone_can_carry_a_match(cache: VerdictCache) -> None:
    """Entries that share exactly one chunk with the query, each a different one."""
    for keep in range(LAYOUT.count):
        flips = [STARTS[i] for i in range(LAYOUT.count) if i != keep]
        cache.put(NS, _sha(keep), _entry(_flip(PHASH, flips)))
    matches = cache.near(NS, PHASH, None, RADIUS, limit=100)
    assert sorted(m.sha256 for m in matches) == [_sha(i) for i in range(LAYOUT.count)]
    assert {m.phash_distance for m in matches} == {RADIUS}


def test_a_smaller_query_radius_filters(cache: VerdictCache) -> None:
    for n in range(RADIUS + 1):
        cache.put(NS, _sha(n), _entry(_flip(PHASH, STARTS[:n])))
    for radius in (0, 2, RADIUS):
        found = cache.near(NS, PHASH, DHASH, radius, limit=100)
        assert [m.phash_distance for m in found] == list(range(radius + 1))


def test_a_larger_query_radius_than_indexed_still_finds_all(open_cache: OpenCache) -> None:
    cache = open_cache(radius=2)  # 3 chunks; the match below differs in every one of them
    layout = ChunkLayout.for_radius(2)
    starts = [sum(layout.widths[:i]) for i in range(layout.count)]
    near = _flip(PHASH, [start + j for start in starts for j in range(2)])
    cache.put(NS, _sha(1), _entry(near))
    cache.put(NS, _sha(2), _entry(_flip(near, [40])))  # 7 bits away
    assert [m.sha256 for m in cache.near(NS, PHASH, None, 6)] == [_sha(1)]


def test_near_reports_dhash_distance(cache: VerdictCache) -> None:
    cache.put(NS, _sha(1), _entry(dhash=_flip(DHASH, [0, 9, 30])))
    cache.put(NS, _sha(2), _entry(dhash=None))
    matches = {m.sha256: m for m in cache.near(NS, PHASH, DHASH, RADIUS)}
    assert matches[_sha(1)].dhash_distance == 3
    assert matches[_sha(2)].dhash_distance is None
    assert [m.dhash_distance for m in cache.near(NS, PHASH, None, RADIUS)] == [None, None]


def test_near_sorts_nearest_first_and_limits(cache: VerdictCache) -> None:
    order = [3, 0, 5, 1, 4, 2]
    for n in order:
        cache.put(NS, _sha(n), _entry(_flip(PHASH, STARTS[:n])))
    found = cache.near(NS, PHASH, DHASH, RADIUS, limit=4)
    assert [m.phash_distance for m in found] == [0, 1, 2, 3]
    assert all(hamming(parse_hash(PHASH), parse_hash(m.entry.phash or "")) < 4 for m in found)
    assert cache.near(NS, PHASH, DHASH, RADIUS, limit=0) == []


def test_non_informative_entries_are_never_matched(cache: VerdictCache) -> None:
    cache.put(NS, _sha(1), _entry(informative=False))
    cache.put(NS, _sha(2), _entry())
    cache.put(NS, _sha(2), _entry(informative=False))  # re-put as flat: leaves the index
    cache.put(NS, _sha(3), _entry(phash=None))
    assert cache.near(NS, PHASH, DHASH, RADIUS) == []
    assert cache.get(NS, _sha(1)) == _entry(informative=False)  # still an exact hit


def test_near_rejects_malformed_queries(cache: VerdictCache) -> None:
    for phash, dhash in [("xyz", None), (PHASH[:-1], None), (PHASH, "not-hex-at-all!!")]:
        with pytest.raises(ValueError):
            cache.near(NS, phash, dhash, RADIUS)
    with pytest.raises(ValueError):
        cache.near(NS, PHASH, None, -1)


def test_many_threads(cache: VerdictCache) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(15):
                sha = _sha(1000 * t + i)
                entry = _entry(_flip(PHASH, [t, 20 + i]))
                cache.put(NS, sha, entry)
                assert cache.get(NS, sha) == entry
                assert sha in {m.sha256 for m in cache.near(NS, PHASH, None, 2, limit=200)}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(cache.near(NS, PHASH, None, 2, limit=200)) == 6 * 15


# --- index layouts (the caches that index) ----------------------------------------------------


def test_a_changed_radius_does_not_read_the_old_layout(open_indexed: OpenCache) -> None:
    open_indexed(radius=RADIUS).put(NS, _sha(1), _entry())
    other = open_indexed(radius=3)
    assert other.get(NS, _sha(1)) == _entry()
    assert other.near(NS, PHASH, DHASH, 3) == []
    other.put(NS, _sha(1), _entry())
    assert [m.sha256 for m in other.near(NS, PHASH, DHASH, 3)] == [_sha(1)]


@pytest.mark.parametrize("indexed", [0, 1, 2, 6, 16])
@pytest.mark.parametrize("query", [0, 1, 3, 6, 12, 16])
def test_chunk_probes_reach_every_hash_within_the_radius(indexed: int, query: int) -> None:
    layout = ChunkLayout.for_radius(indexed)
    assert sum(layout.widths) == 64 and max(layout.widths) - min(layout.widths) <= 1
    if layout.probe_count(query) > MAX_PROBES:
        with pytest.raises(ValueError):
            probes(layout, 0, query)
        return
    rng = random.Random(indexed * 100 + query)
    for _ in range(50):
        value = rng.getrandbits(64)
        probed = set(probes(layout, value, query))
        if query <= indexed:
            assert probed == set(enumerate(layout.chunks(value)))
        near = value
        for position in rng.sample(range(64), query):
            near ^= 1 << position
        assert probed & set(enumerate(layout.chunks(near))), (value, near)


# --- Redis specifics --------------------------------------------------------------------------


def _redis_cache(url: str, ttl_s: int = 60) -> RedisCache:
    return RedisCache(url, f"t{uuid.uuid4().hex[:10]}", ttl_s, radius=RADIUS)


def test_redis_keys_stay_under_prefix_with_layout_and_ttl(
    redis_url: str, redis_raw: redis.Redis
) -> None:
    cache = _redis_cache(redis_url)
    try:
        cache.put(NS, _sha(1), _entry())
        cache.put(NS, _sha(2), _entry(informative=False))
        keys = sorted(redis_raw.keys(f"{cache.prefix}:*"))
        chunks = LAYOUT.chunks(parse_hash(PHASH))
        assert keys == sorted(
            [f"{cache.prefix}:v1:{NS}:sha:{_sha(n)}" for n in (1, 2)]
            + [f"{cache.prefix}:v1:{NS}:mih7:{i}:{chunk}" for i, chunk in enumerate(chunks)]
        )
        assert all(0 < redis_raw.ttl(key) <= 60 for key in keys)
        assert redis_raw.smembers(f"{cache.prefix}:v1:{NS}:mih7:3:{chunks[3]}") == {_sha(1)}
    finally:
        cache.close()


def test_redis_entries_and_index_expire(redis_url: str, redis_raw: redis.Redis) -> None:
    cache = _redis_cache(redis_url, ttl_s=1)
    try:
        cache.put(NS, _sha(1), _entry())
        assert cache.get(NS, _sha(1)) == _entry()
        time.sleep(1.1)
        assert cache.get(NS, _sha(1)) is None
        assert cache.near(NS, PHASH, DHASH, RADIUS) == []
        assert redis_raw.keys(f"{cache.prefix}:*") == []
    finally:
        cache.close()


def test_redis_drops_members_whose_entry_expired(redis_url: str, redis_raw: redis.Redis) -> None:
    cache = _redis_cache(redis_url)
    try:
        cache.put(NS, _sha(1), _entry())
        cache.put(NS, _sha(2), _entry())
        redis_raw.delete(f"{cache.prefix}:v1:{NS}:sha:{_sha(1)}")  # as if it expired
        assert [m.sha256 for m in cache.near(NS, PHASH, DHASH, RADIUS)] == [_sha(2)]
        sets = redis_raw.keys(f"{cache.prefix}:v1:{NS}:mih7:*")
        assert len(sets) == LAYOUT.count
        assert all(redis_raw.smembers(key) == {_sha(2)} for key in sets)
    finally:
        cache.close()


def test_redis_refuses_ambiguous_keys(redis_url: str) -> None:
    cache = _redis_cache(redis_url)
    try:
        for namespace in ("", "result", "result:x"):
            with pytest.raises(ValueError):
                cache.get(namespace, _sha(1))
        for sha in ("A" * 64, "a" * 63, "a" * 63 + ":"):
            with pytest.raises(ValueError):
                cache.put(NS, sha, _entry())
    finally:
        cache.close()


# --- what a near match may lend -------------------------------------------------------------


def _match(
    sha: int, nsfw: float, phash_distance: int, dhash_distance: int | None, informative: bool = True
) -> NearMatch:
    return NearMatch(
        _sha(sha), _entry(nsfw=nsfw, informative=informative), phash_distance, dhash_distance
    )


def _blocks(entry: CachedEntry) -> bool:
    return entry.probabilities["nsfw"] >= 0.8


def test_a_blocking_near_match_is_reused_nearest_first() -> None:
    matches = [_match(1, 0.9, 4, None), _match(2, 0.95, 2, 40)]
    assert choose_near_match(matches, _blocks, RADIUS) == matches[1]


@pytest.mark.parametrize("nsfw", [0.0, 0.1, 0.5, 0.79])
def test_a_near_match_below_block_is_never_reused(nsfw: float) -> None:
    # Even with both hashes at distance 0: a near match is another image.
    assert choose_near_match([_match(1, nsfw, 0, 0)], _blocks, RADIUS) is None


def test_a_block_wins_over_nearer_matches_that_do_not_block() -> None:
    matches = [_match(1, 0.1, 0, 0), _match(2, 0.5, 1, 1), _match(3, 0.9, 5, 30)]
    assert choose_near_match(matches, _blocks, RADIUS) == matches[2]


def test_matches_past_the_radius_or_flat_are_ignored() -> None:
    matches = [_match(1, 0.9, RADIUS + 1, 0), _match(2, 0.9, 0, 0, informative=False)]
    assert choose_near_match(matches, _blocks, RADIUS) is None
    assert choose_near_match([], _blocks, RADIUS) is None


# --- result store ---------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def results(request: pytest.FixtureRequest) -> Iterator[ResultStore]:
    if request.param == "memory":
        yield MemoryResultStore()
        return
    store = RedisResultStore(request.getfixturevalue("redis_url"), f"t{uuid.uuid4().hex[:10]}", 60)
    yield store
    store.close()


def test_the_first_stored_result_is_the_one_kept(results: ResultStore) -> None:
    assert results.get("req-1") is None
    assert results.put_if_absent("req-1", '{"verdict": "block"}') == '{"verdict": "block"}'
    assert results.put_if_absent("req-1", '{"verdict": "allow"}') == '{"verdict": "block"}'
    assert results.get("req-1") == '{"verdict": "block"}'
    assert results.get("req-2") is None


def test_a_finished_action_replaces_the_stored_result(results: ResultStore) -> None:
    results.put_if_absent("req-1", '{"action": "none"}')
    results.replace("req-1", '{"action": "quarantine_move"}')
    assert results.get("req-1") == '{"action": "quarantine_move"}'
    assert results.put_if_absent("req-1", '{"action": "none"}') == '{"action": "quarantine_move"}'


def test_racing_deliveries_all_publish_one_result(results: ResultStore) -> None:
    start = threading.Barrier(8)
    seen: list[str] = []

    def deliver(n: int) -> None:
        start.wait()
        seen.append(results.put_if_absent("req:race", f'{{"delivery": {n}}}'))

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(seen) == 8 and len(set(seen)) == 1
    assert results.get("req:race") == seen[0]


def test_an_empty_request_id_is_refused(results: ResultStore) -> None:
    with pytest.raises(ValueError):
        results.put_if_absent("", "{}")


def test_redis_results_live_under_the_prefix_and_expire(
    redis_url: str, redis_raw: redis.Redis
) -> None:
    store = RedisResultStore(redis_url, f"t{uuid.uuid4().hex[:10]}", 1)
    try:
        store.put_if_absent("req-1", "{}")
        assert redis_raw.keys(f"{store.prefix}:*") == [f"{store.prefix}:v1:result:req-1"]
        time.sleep(1.1)
        assert store.get("req-1") is None
        assert store.put_if_absent("req-1", '{"again": true}') == '{"again": true}'
    finally:
        store.close()
