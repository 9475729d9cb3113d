"""The bank store contract, run on both stores (memory and Redis), and what only Redis adds:
its key layout, a crash in the middle of an add, one round trip per match, and failures.

Redis here is a real redis-server this module starts on a free port; every test gets a
database of its own on it. The kill and hang tests start a server of their own.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
from typer.testing import CliRunner

from tests.support.images import flat, recompressed, textured
from tests.support.redis_server import RedisServer
from worker.banks import (
    BankInfo,
    BankMatch,
    BankStore,
    MemoryBankStore,
    RedisBankStore,
    bank_client,
    pdq_hash,
)
from worker.cli.bank import register
from worker.errors import BankUnavailable, ConfigError, InvalidHashList, UnknownBank
from worker.hashing.pdq_index import CHUNK_BITS, CHUNKS

pytestmark = pytest.mark.integration

NOW = 1_700_000_000.0
BASE = int("3b27b2417fb7f8f61318b31b746aa46e33111b912b956ce46c671709278c0f8d", 16)
OTHER = BASE ^ int("f0" * 32, 16)  # 128 bits away


def hx(value: int) -> str:
    return format(value, "064x")


def spread(value: int, distance: int, offset: int = 0) -> int:
    """``value`` with ``distance`` bits flipped, dealt round-robin over the 16 chunks (the
    case the multi-index's pigeonhole is tight on)."""
    for k in range(distance):
        chunk, bit = (k + offset) % CHUNKS, (k + offset) // CHUNKS
        value ^= 1 << (chunk * CHUNK_BITS + bit)
    return value


# --- stores -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("banks-redis")) as server:
        yield server


_databases = itertools.count()


@pytest.fixture
def redis_url(server: RedisServer) -> str:
    """A database of this test's own."""
    return f"redis://127.0.0.1:{server.port}/{next(_databases)}"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[BankStore]:
    if request.param == "memory":
        yield MemoryBankStore(clock=lambda: NOW)
        return
    url = request.getfixturevalue("redis_url")
    redis_store = RedisBankStore(url, prefix="t", clock=lambda: NOW)
    yield redis_store
    redis_store.close()


# --- the contract -----------------------------------------------------------------------------


def test_add_counts_only_new_hashes_and_creates_an_enabled_bank(store: BankStore) -> None:
    a, b, c = hx(BASE), hx(OTHER), hx(BASE ^ 1)
    assert store.add("partner", [a, b, a], "list.txt") == 2
    assert store.add("partner", [a.upper(), b], "again.txt") == 0
    assert store.add("partner", [b, c], "more.txt") == 1
    assert store.banks() == [BankInfo("partner", True, 3, NOW, "list.txt")]


def test_an_empty_add_still_creates_the_bank_and_banks_are_listed_by_name(
    store: BankStore,
) -> None:
    assert store.add("zz", [], "none") == 0
    store.add("aa", [hx(BASE)], "one")
    assert [(b.name, b.count) for b in store.banks()] == [("aa", 1), ("zz", 0)]


def test_a_bad_hash_or_name_adds_nothing(store: BankStore) -> None:
    with pytest.raises(InvalidHashList, match="hash 2 of 3"):
        store.add("partner", [hx(BASE), "xyz", hx(OTHER)], "list.txt")
    for name in ("", "a b", "a:b", "x" * 65, "ü"):
        with pytest.raises(ConfigError, match="bad bank name"):
            store.add(name, [hx(BASE)], "list.txt")
    assert store.banks() == []
    assert store.match(hx(BASE)) is None


@pytest.mark.parametrize("distance", [0, 1, 15, 16, 30, 31])
def test_a_hash_within_31_is_found_with_its_distance(store: BankStore, distance: int) -> None:
    store.add("partner", [hx(BASE), hx(OTHER)], "list.txt")
    query = hx(spread(BASE, distance, offset=distance))
    assert store.match(query) == BankMatch("partner", distance, hx(BASE))


def test_beyond_the_distance_is_no_match_and_a_larger_radius_reaches_it(
    store: BankStore,
) -> None:
    store.add("partner", [hx(BASE)], "list.txt")
    assert store.match(hx(spread(BASE, 32))) is None
    assert store.match(hx(spread(BASE, 10)), max_distance=9) is None
    assert store.match(hx(spread(BASE, 47)), max_distance=47) == BankMatch("partner", 47, hx(BASE))
    with pytest.raises(ConfigError, match="index lookups"):
        store.match(hx(BASE), max_distance=48)


def test_the_closest_wins_and_ties_go_to_the_lowest_bank_name(store: BankStore) -> None:
    far, near = spread(BASE, 20), spread(BASE, 5, offset=40)
    store.add("b-second", [hx(far), hx(near)], "b")
    assert store.match(hx(BASE)) == BankMatch("b-second", 5, hx(near))
    store.add("c-third", [hx(spread(BASE, 3, offset=90))], "c")
    assert store.match(hx(BASE)) == BankMatch("c-third", 3, hx(spread(BASE, 3, offset=90)))
    store.add("a-first", [hx(spread(BASE, 3, offset=7))], "a")
    assert store.match(hx(BASE)) == BankMatch("a-first", 3, hx(spread(BASE, 3, offset=7)))
    twins = sorted([spread(BASE, 2, offset=1), spread(BASE, 2, offset=200)])
    store.add("d-fourth", [hx(twins[1]), hx(twins[0])], "d")
    assert store.match(hx(BASE)) == BankMatch("d-fourth", 2, hx(twins[0]))  # lowest hash


def test_only_enabled_banks_match(store: BankStore) -> None:
    store.add("mine", [hx(BASE)], "mine")
    store.add("partner", [hx(spread(BASE, 9))], "partner")
    store.set_enabled("mine", False)
    assert store.match(hx(BASE)) == BankMatch("partner", 9, hx(spread(BASE, 9)))
    store.set_enabled("partner", False)
    assert store.match(hx(BASE)) is None
    store.set_enabled("mine", True)
    assert store.match(hx(BASE)) == BankMatch("mine", 0, hx(BASE))
    assert [(b.name, b.enabled) for b in store.banks()] == [("mine", True), ("partner", False)]
    store.add("partner", [hx(OTHER)], "later")  # adding keeps a bank's switch as it was
    assert [b.enabled for b in store.banks()] == [True, False]
    with pytest.raises(UnknownBank, match="no bank named 'ghost'"):
        store.set_enabled("ghost", True)


def test_real_images_near_copies_match(store: BankStore) -> None:
    banked = {seed: pdq_hash(textured(seed)) for seed in (30, 31, 32)}
    store.add("known", [h.hex for h in banked.values()], "images")
    for seed, known in banked.items():
        found = store.match(pdq_hash(recompressed(textured(seed))).hex)
        assert found is not None and found.hash == known.hex and found.distance <= 31
    assert store.match(pdq_hash(textured(77)).hex) is None


# --- Redis only -------------------------------------------------------------------------------


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisBankStore]:
    store = RedisBankStore(redis_url, prefix="t", clock=lambda: NOW)
    yield store
    store.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_the_key_layout_is_as_documented(redis_store: RedisBankStore, raw: redis.Redis) -> None:
    redis_store.add("partner", [hx(BASE)], "list.txt")
    record = BASE.to_bytes(32, "big")
    chunks = [BASE >> (256 - 16 * (i + 1)) & 0xFFFF for i in range(16)]
    index_keys = {f"t:v1:bank:partner:mih:{i}:{c:04x}".encode() for i, c in enumerate(chunks)}
    assert set(raw.keys("*")) == {b"t:v1:bank:registry", b"t:v1:bank:partner:hashes"} | index_keys
    assert all(raw.get(key) == record for key in index_keys)
    assert raw.smembers("t:v1:bank:partner:hashes") == {record}
    entry = raw.hget("t:v1:bank:registry", "partner")
    assert isinstance(entry, bytes)
    assert re.fullmatch(rb'\{"created": 17\d+\.0, "source": "list.txt", "enabled": true\}', entry)


def test_a_crash_before_an_add_finishes_leaves_counts_right_and_a_rerun_completes_it(
    redis_store: RedisBankStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_store.add("partner", [hx(OTHER)], "first")
    original = redis_store._commands

    def crash_halfway_through_the_index(commands: list[tuple[Any, ...]]) -> list[Any]:
        if commands and commands[0][0] == "append":
            original(commands[: len(commands) // 2])
            raise redis.ConnectionError("connection lost")
        return original(commands)

    monkeypatch.setattr(redis_store, "_commands", crash_halfway_through_the_index)
    with pytest.raises(BankUnavailable, match="connection lost"):
        redis_store.add("partner", [hx(BASE)], "second")
    with pytest.raises(BankUnavailable):
        redis_store.add("fresh", [hx(BASE)], "second")
    assert [(b.name, b.count) for b in redis_store.banks()] == [("partner", 1)]  # no "fresh"
    monkeypatch.undo()
    assert redis_store.add("partner", [hx(BASE)], "second") == 1
    assert redis_store.add("fresh", [hx(BASE)], "second") == 1
    assert [(b.name, b.count) for b in redis_store.banks()] == [("fresh", 1), ("partner", 2)]
    assert redis_store.match(hx(spread(BASE, 31))) == BankMatch("fresh", 31, hx(BASE))


def test_a_match_is_one_round_trip_once_the_enabled_banks_are_known(
    redis_store: RedisBankStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c"):
        redis_store.add(name, [hx(spread(BASE, 5, offset=ord(name)))], name)
    redis_store.set_enabled("c", False)
    executes: list[int] = []
    real_execute = redis.client.Pipeline.execute

    def counted(pipe: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        executes.append(len(pipe.command_stack))
        return real_execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    redis_store.match(hx(BASE))  # first match: learns the enabled banks
    executes.clear()
    assert redis_store.match(hx(BASE)) is not None
    assert executes == [3]  # registry + one MGET per enabled bank, one round trip
    monkeypatch.undo()
    redis_store.set_enabled("c", True)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    executes.clear()
    redis_store.match(hx(BASE))
    assert executes == [3, 1]  # a bank enabled since: one more round trip, once
    executes.clear()
    redis_store.match(hx(BASE))
    assert executes == [4]


def test_a_corrupt_index_entry_is_unavailable_not_a_miss(
    redis_store: RedisBankStore, raw: redis.Redis
) -> None:
    redis_store.add("partner", [hx(OTHER)], "list.txt")
    raw.set(f"t:v1:bank:partner:mih:0:{BASE >> 240:04x}", b"short")
    with pytest.raises(BankUnavailable, match="corrupt"):
        redis_store.match(hx(BASE))
    raw.hset("t:v1:bank:registry", "partner", "{not json")
    with pytest.raises(BankUnavailable, match="unreadable registry entry"):
        redis_store.banks()


def test_a_decoding_client_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ConfigError, match="decode_responses=False"):
        RedisBankStore(client)
    client.close()
    shared = bank_client(redis_url)
    RedisBankStore(shared, prefix="t").close()
    assert shared.ping()  # a shared client stays open for its owner
    shared.close()


# --- Redis down -------------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_a_killed_redis_raises_bank_unavailable_never_no_match(own_server: RedisServer) -> None:
    store = RedisBankStore(own_server.url, timeout_s=0.5)
    store.add("partner", [hx(BASE)], "list.txt")
    assert store.match(hx(BASE)) is not None
    own_server.stop()
    for call in (lambda: store.match(hx(BASE)), store.banks, lambda: store.add("p", [], "x")):
        with pytest.raises(BankUnavailable, match="hash banks \\(redis\\)") as caught:
            call()
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        assert caught.value.retryable
    own_server.start()
    assert store.match(hx(BASE)) is None  # a fresh, empty server: answers again
    store.close()


def test_a_hung_redis_raises_bank_unavailable_within_the_timeout(own_server: RedisServer) -> None:
    store = RedisBankStore(own_server.url, timeout_s=0.2)
    store.add("partner", [hx(BASE)], "list.txt")
    own_server.pause()
    try:
        with pytest.raises(BankUnavailable) as caught:
            store.match(hx(BASE))
        assert isinstance(caught.value.__cause__, redis.TimeoutError)
    finally:
        own_server.resume()
    assert store.match(hx(BASE)) == BankMatch("partner", 0, hx(BASE))
    store.close()


# --- `modq bank` on Redis ---------------------------------------------------------------------


def test_the_bank_commands_on_redis(tmp_path: Path, redis_url: str) -> None:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modq, as `worker.cli` builds it."""

    register(app)
    env = {"MODQ_BANK_URL": redis_url, "MODQ_CACHE_PREFIX": "cli", "COLUMNS": "200"}
    folder = tmp_path / "known"
    folder.mkdir()
    textured(40).save(folder / "a.png")
    textured(41).save(folder / "b.jpg", quality=95)
    flat().save(folder / "flat.png")

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, ["bank", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.stdout

    assert "bank mine: 2 hashes added, 0 already there" in run("add", "mine", str(folder))
    assert "bank mine: 0 hashes added, 2 already there" in run("add", "mine", str(folder))
    store = RedisBankStore(redis_url, prefix="cli")
    query = pdq_hash(recompressed(textured(41))).hex
    found = store.match(query)
    assert found is not None and found.bank == "mine"
    run("disable", "mine")
    assert store.match(query) is None
    listed = run("list")
    assert re.search(r"mine\s+│\s+no\s+│\s+2\s+│", listed), listed
    run("enable", "mine")
    assert store.match(query) == found
    store.close()
    result = CliRunner().invoke(app, ["bank", "enable", "ghost"], env=env)
    assert result.exit_code == 2 and "[unknown_bank] no bank named 'ghost'" in result.stderr
