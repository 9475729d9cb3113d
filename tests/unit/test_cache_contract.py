"""The contract every verdict cache and every result store keeps, what a perceptual match may
lend (block only), the chunk index's probes, and what only SQLite adds.

``CacheContract`` and ``ResultStoreContract`` are the one suite every implementation runs:
here on the in-process ones (memory, SQLite); tests/integration/test_redis_cache.py runs the
same classes on Redis, against a redis-server of its own.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from worker.cache import (
    CachedEntry,
    MemoryCache,
    MemoryResultStore,
    NearMatch,
    ResultStore,
    SQLiteCache,
    VerdictCache,
    choose_near_match,
)
from worker.hashing.mih import ChunkLayout, hamming
from worker.hashing.phash_index import MAX_PROBES, parse_hash, probes

RADIUS = 6
LAYOUT = ChunkLayout.for_radius(RADIUS)
STARTS = [sum(LAYOUT.widths[:i]) for i in range(LAYOUT.count)]  # first bit of each chunk
NS = "org/model@rev1/pp2/draft512"
NS_OTHER = "org:model@rev2/pp2/exact"  # ':' and '/' are both fine in a namespace
PHASH = "c3a5f00f1e2d3c4b"
DHASH = "0f1e2d3c4b5a6978"
PDQ = "3b27b2417fb7f8f61318b31b746aa46e33111b912b956ce46c671709278c0f8d"

#: ``open_cache(radius=…, ttl_s=…)`` opens the same backing cache (one memory dict, one
#: file, one Redis prefix) on every call; ``radius`` is the one it indexes for
OpenCache = Callable[..., VerdictCache]


def sha(n: int) -> str:
    return f"{n:064x}"


def flip(hex_hash: str, positions: list[int]) -> str:
    """Flip bits, counted from the most significant (position 0)."""
    value = parse_hash(hex_hash)
    for position in positions:
        value ^= 1 << (63 - position)
    return f"{value:016x}"


def entry(
    phash: str | None = PHASH,
    dhash: str | None = DHASH,
    nsfw: float = 0.9,
    informative: bool = True,
) -> CachedEntry:
    return CachedEntry({"sfw": 1.0 - nsfw, "nsfw": nsfw}, 1, phash, dhash, informative)


SPREADS = {
    # r flipped bits in r different chunks: one chunk still agrees (the pigeonhole case)
    "one-per-chunk": [STARTS[i] for i in range(RADIUS + 1)],
    "chunk-ends": [STARTS[i] + LAYOUT.widths[i] - 1 for i in range(RADIUS + 1)],
    # all flips in one or two chunks
    "clustered": [*range(STARTS[2], STARTS[2] + 5), STARTS[5], STARTS[5] + 1],
    "random": random.Random(7).sample(range(64), RADIUS + 1),
}


# --- the verdict cache contract -----------------------------------------------------------------


class CacheContract:
    """What every VerdictCache keeps. A subclass per implementation supplies ``open_cache``
    (an ``OpenCache``) and ``open_indexed`` (the same, for a cache that keeps a chunk index;
    the memory cache searches by brute force and has none)."""

    @pytest.fixture
    def cache(self, open_cache: OpenCache) -> VerdictCache:
        return open_cache()

    # exact tier

    def test_get_misses_then_round_trips_every_field(self, cache: VerdictCache) -> None:
        assert cache.get(NS, sha(1)) is None
        stored = CachedEntry({"neutral": 0.25, "porn": 0.75}, 4, PHASH, DHASH, True, PDQ, 87)
        cache.put(NS, sha(1), stored)
        assert cache.get(NS, sha(1)) == stored
        assert cache.get(NS, sha(2)) is None
        exact = CachedEntry({"sfw": 0.876543211, "nsfw": 0.123456789}, 3, PHASH, None, True)
        cache.put(NS, sha(3), exact)  # a float keeps every digit
        got = cache.get(NS, sha(3))
        assert got == exact and got is not None and got.probabilities["nsfw"] == 0.123456789

    def test_an_entry_without_hashes_round_trips(self, cache: VerdictCache) -> None:
        graded = CachedEntry({"neutral": 0.7, "low": 0.2, "medium": 0.05, "high": 0.05})
        cache.put(NS, sha(1), graded)
        assert cache.get(NS, sha(1)) == graded
        assert cache.near(NS, PHASH, DHASH, RADIUS) == []

    def test_put_replaces(self, cache: VerdictCache) -> None:
        cache.put(NS, sha(1), entry(nsfw=0.1))
        cache.put(NS, sha(1), entry(nsfw=0.8, informative=False))
        assert cache.get(NS, sha(1)) == entry(nsfw=0.8, informative=False)

    def test_namespaces_are_isolated_in_both_tiers(self, cache: VerdictCache) -> None:
        cache.put(NS, sha(1), entry(nsfw=0.1))
        assert cache.get(NS_OTHER, sha(1)) is None
        assert cache.near(NS_OTHER, PHASH, DHASH, RADIUS) == []
        cache.put(NS_OTHER, sha(1), entry(nsfw=0.7))
        assert cache.get(NS, sha(1)) == entry(nsfw=0.1)
        assert cache.get(NS_OTHER, sha(1)) == entry(nsfw=0.7)
        [match] = cache.near(NS, PHASH, DHASH, RADIUS)
        assert match.entry == entry(nsfw=0.1)

    # perceptual tier

    def test_near_finds_the_same_hash_at_distance_zero(self, cache: VerdictCache) -> None:
        cache.put(NS, sha(1), entry())
        assert cache.near(NS, PHASH, DHASH, RADIUS) == [NearMatch(sha(1), entry(), 0, 0)]

    @pytest.mark.parametrize("spread", SPREADS)
    def test_near_finds_radius_and_not_radius_plus_one(
        self, cache: VerdictCache, spread: str
    ) -> None:
        positions = SPREADS[spread]
        at_radius, past_radius = flip(PHASH, positions[:RADIUS]), flip(PHASH, positions)
        cache.put(NS, sha(1), entry(at_radius))
        cache.put(NS, sha(2), entry(past_radius))
        [match] = cache.near(NS, PHASH, None, RADIUS)
        assert (match.sha256, match.phash_distance) == (sha(1), RADIUS)
        # it was indexed all right: from its own hash it is at 0, and the other one at 1
        assert [m.sha256 for m in cache.near(NS, past_radius, None, RADIUS)] == [sha(2), sha(1)]

    def test_every_chunk_alone_can_carry_a_match(self, cache: VerdictCache) -> None:
        """Entries that share exactly one chunk with the query, each a different one."""
        for keep in range(LAYOUT.count):
            flips = [STARTS[i] for i in range(LAYOUT.count) if i != keep]
            cache.put(NS, sha(keep), entry(flip(PHASH, flips)))
        matches = cache.near(NS, PHASH, None, RADIUS, limit=100)
        assert sorted(m.sha256 for m in matches) == [sha(i) for i in range(LAYOUT.count)]
        assert {m.phash_distance for m in matches} == {RADIUS}

    def test_a_smaller_query_radius_filters(self, cache: VerdictCache) -> None:
        for n in range(RADIUS + 1):
            cache.put(NS, sha(n), entry(flip(PHASH, STARTS[:n])))
        for radius in (0, 2, RADIUS):
            found = cache.near(NS, PHASH, DHASH, radius, limit=100)
            assert [m.phash_distance for m in found] == list(range(radius + 1))

    def test_a_larger_query_radius_than_indexed_still_finds_all(
        self, open_cache: OpenCache
    ) -> None:
        cache = open_cache(radius=2)  # 3 chunks; the match below differs in every one of them
        layout = ChunkLayout.for_radius(2)
        starts = [sum(layout.widths[:i]) for i in range(layout.count)]
        near = flip(PHASH, [start + j for start in starts for j in range(2)])
        cache.put(NS, sha(1), entry(near))
        cache.put(NS, sha(2), entry(flip(near, [40])))  # 7 bits away
        assert [m.sha256 for m in cache.near(NS, PHASH, None, 6)] == [sha(1)]

    def test_near_reports_dhash_distance(self, cache: VerdictCache) -> None:
        cache.put(NS, sha(1), entry(dhash=flip(DHASH, [0, 9, 30])))
        cache.put(NS, sha(2), entry(dhash=None))
        matches = {m.sha256: m for m in cache.near(NS, PHASH, DHASH, RADIUS)}
        assert matches[sha(1)].dhash_distance == 3
        assert matches[sha(2)].dhash_distance is None
        assert [m.dhash_distance for m in cache.near(NS, PHASH, None, RADIUS)] == [None, None]

    def test_near_sorts_nearest_first_and_limits(self, cache: VerdictCache) -> None:
        order = [3, 0, 5, 1, 4, 2]
        for n in order:
            cache.put(NS, sha(n), entry(flip(PHASH, STARTS[:n])))
        found = cache.near(NS, PHASH, DHASH, RADIUS, limit=4)
        assert [m.phash_distance for m in found] == [0, 1, 2, 3]
        assert all(hamming(parse_hash(PHASH), parse_hash(m.entry.phash or "")) < 4 for m in found)
        assert cache.near(NS, PHASH, DHASH, RADIUS, limit=0) == []

    def test_non_informative_entries_are_never_matched(self, cache: VerdictCache) -> None:
        cache.put(NS, sha(1), entry(informative=False))
        cache.put(NS, sha(2), entry())
        cache.put(NS, sha(2), entry(informative=False))  # re-put as flat: leaves the index
        cache.put(NS, sha(3), entry(phash=None))
        assert cache.near(NS, PHASH, DHASH, RADIUS) == []
        assert cache.get(NS, sha(1)) == entry(informative=False)  # still an exact hit

    def test_near_rejects_malformed_queries(self, cache: VerdictCache) -> None:
        for phash, dhash in [("xyz", None), (PHASH[:-1], None), (PHASH, "not-hex-at-all!!")]:
            with pytest.raises(ValueError):
                cache.near(NS, phash, dhash, RADIUS)
        with pytest.raises(ValueError):
            cache.near(NS, PHASH, None, -1)

    def test_many_threads(self, cache: VerdictCache) -> None:
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def work(t: int) -> None:
            try:
                start.wait()
                for i in range(15):
                    key = sha(1000 * t + i)
                    stored = entry(flip(PHASH, [t, 20 + i]))
                    cache.put(NS, key, stored)
                    assert cache.get(NS, key) == stored
                    assert key in {m.sha256 for m in cache.near(NS, PHASH, None, 2, limit=200)}
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors
        assert len(cache.near(NS, PHASH, None, 2, limit=200)) == 6 * 15
        for t in range(6):  # every write is still there once the threads are done
            for i in range(15):
                assert cache.get(NS, sha(1000 * t + i)) == entry(flip(PHASH, [t, 20 + i]))

    # index layouts (the caches that keep an index)

    def test_a_changed_radius_does_not_read_the_old_layout(self, open_indexed: OpenCache) -> None:
        open_indexed(radius=RADIUS).put(NS, sha(1), entry())
        other = open_indexed(radius=3)
        assert other.get(NS, sha(1)) == entry()
        assert other.near(NS, PHASH, DHASH, 3) == []
        other.put(NS, sha(1), entry())
        assert [m.sha256 for m in other.near(NS, PHASH, DHASH, 3)] == [sha(1)]


def _open_local(kind: str, tmp_path: Path) -> Iterator[OpenCache]:
    closers: list[Callable[[], None]] = []
    memory = MemoryCache()

    def factory(radius: int = RADIUS, ttl_s: int = 60) -> VerdictCache:
        if kind == "memory":
            return memory
        lite = SQLiteCache(tmp_path / "verdicts.sqlite3", radius=radius)
        closers.append(lite.close)
        return lite

    yield factory
    for close in closers:
        close()


class TestCacheContract(CacheContract):
    """The contract on the memory and SQLite caches."""

    @pytest.fixture(params=["memory", "sqlite"])
    def open_cache(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenCache]:
        yield from _open_local(str(request.param), tmp_path)

    @pytest.fixture
    def open_indexed(self, tmp_path: Path) -> Iterator[OpenCache]:
        yield from _open_local("sqlite", tmp_path)


# --- what only SQLite adds ----------------------------------------------------------------------


def test_sqlite_makes_its_folder_and_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "verdicts.sqlite3"
    first = SQLiteCache(path)
    first.put(NS, sha(1), entry(nsfw=0.42))
    first.close()
    assert path.is_file()
    second = SQLiteCache(path)
    try:
        assert second.get(NS, sha(1)) == entry(nsfw=0.42)
        assert second.get(NS_OTHER, sha(1)) is None
    finally:
        second.close()


def test_sqlite_two_open_handles_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.sqlite3"
    writer, reader = SQLiteCache(path), SQLiteCache(path)
    try:
        writer.put(NS, sha(2), entry(nsfw=0.3))
        assert reader.get(NS, sha(2)) == entry(nsfw=0.3)
        assert [m.sha256 for m in reader.near(NS, PHASH, DHASH, RADIUS)] == [sha(2)]
    finally:
        writer.close()
        reader.close()


# --- the stored form of an entry ----------------------------------------------------------------


def test_entries_round_trip_through_json_and_old_rows_still_read() -> None:
    for stored in (entry(), entry(dhash=None, informative=False), CachedEntry({"a": 1.0})):
        assert CachedEntry.from_json(stored.to_json()) == stored
    old = '{"dhash": null, "frames": 2, "phash": "c3a5f00f1e2d3c4b", "probabilities": {"a": 1.0}}'
    read = CachedEntry.from_json(old)
    assert read == CachedEntry({"a": 1.0}, 2, PHASH, None, informative=False)
    newer = read.to_json().replace('"frames"', '"from_the_future": 1, "frames"')
    assert CachedEntry.from_json(newer) == read


# --- the chunk index's probes -------------------------------------------------------------------


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


# --- what a near match may lend -----------------------------------------------------------------


def _match(
    n: int, nsfw: float, phash_distance: int, dhash_distance: int | None, informative: bool = True
) -> NearMatch:
    return NearMatch(
        sha(n), entry(nsfw=nsfw, informative=informative), phash_distance, dhash_distance
    )


def _blocks(cached: CachedEntry) -> bool:
    return cached.probabilities["nsfw"] >= 0.8


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


# --- the result store contract ------------------------------------------------------------------


class ResultStoreContract:
    """What every ResultStore keeps; a subclass per implementation supplies ``results``."""

    def test_the_first_stored_result_is_the_one_kept(self, results: ResultStore) -> None:
        assert results.get("req-1") is None
        assert results.put_if_absent("req-1", '{"verdict": "block"}') == '{"verdict": "block"}'
        assert results.put_if_absent("req-1", '{"verdict": "allow"}') == '{"verdict": "block"}'
        assert results.get("req-1") == '{"verdict": "block"}'
        assert results.get("req-2") is None

    def test_a_finished_action_replaces_the_stored_result(self, results: ResultStore) -> None:
        results.put_if_absent("req-1", '{"action": "none"}')
        results.replace("req-1", '{"action": "quarantine_move"}')
        assert results.get("req-1") == '{"action": "quarantine_move"}'
        again = results.put_if_absent("req-1", '{"action": "none"}')
        assert again == '{"action": "quarantine_move"}'

    def test_racing_deliveries_all_publish_one_result(self, results: ResultStore) -> None:
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

    def test_an_empty_request_id_is_refused(self, results: ResultStore) -> None:
        with pytest.raises(ValueError):
            results.put_if_absent("", "{}")


class TestResultStoreContract(ResultStoreContract):
    """The contract on the memory result store."""

    @pytest.fixture
    def results(self) -> ResultStore:
        return MemoryResultStore()
