"""Verdict caches (one contract, two implementations) and the scores-to-verdict policy."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from worker.cache import CachedEntry, MemoryCache, SQLiteCache, VerdictCache
from worker.errors import ConfigError
from worker.messages import Verdict
from worker.models.card import ModelCard
from worker.policy import POLICY_NAMES, Policy, load_policy

SHA_A = "a" * 64
SHA_B = "b" * 64
NS_1 = "model-one@rev1/pp1/draft512"
NS_2 = "model-two@rev1/pp1/draft512"


def _entry(nsfw: float, frames: int = 1) -> CachedEntry:
    probabilities = {"sfw": 1.0 - nsfw, "nsfw": nsfw}
    return CachedEntry(probabilities, frames, "8f0f0f0f0f0f0f0f", "00ff00ff00ff00ff")


# --- the cache contract ---------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def make_cache(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], VerdictCache]]:
    """A factory: every call opens the same cache (for SQLite, the same file) again."""
    opened: list[SQLiteCache] = []
    memory = MemoryCache()

    def factory() -> VerdictCache:
        if request.param == "memory":
            return memory
        cache = SQLiteCache(tmp_path / "cache" / "verdicts.sqlite3")
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        cache.close()


def test_miss_returns_none(make_cache: Callable[[], VerdictCache]) -> None:
    assert make_cache().get(NS_1, SHA_A) is None


def test_put_get_roundtrip(make_cache: Callable[[], VerdictCache]) -> None:
    cache = make_cache()
    entry = _entry(0.123456789, frames=3)
    cache.put(NS_1, SHA_A, entry)
    got = cache.get(NS_1, SHA_A)
    assert got == entry
    assert got is not None and got.probabilities["nsfw"] == 0.123456789
    assert cache.get(NS_1, SHA_B) is None


def test_put_replaces(make_cache: Callable[[], VerdictCache]) -> None:
    cache = make_cache()
    cache.put(NS_1, SHA_A, _entry(0.1))
    cache.put(NS_1, SHA_A, _entry(0.9))
    assert cache.get(NS_1, SHA_A) == _entry(0.9)


def test_namespaces_are_isolated(make_cache: Callable[[], VerdictCache]) -> None:
    cache = make_cache()
    cache.put(NS_1, SHA_A, _entry(0.1))
    assert cache.get(NS_2, SHA_A) is None
    cache.put(NS_2, SHA_A, _entry(0.7))
    assert cache.get(NS_1, SHA_A) == _entry(0.1)
    assert cache.get(NS_2, SHA_A) == _entry(0.7)


def test_entry_without_hashes_roundtrips(make_cache: Callable[[], VerdictCache]) -> None:
    cache = make_cache()
    entry = CachedEntry({"neutral": 0.7, "low": 0.2, "medium": 0.05, "high": 0.05})
    cache.put(NS_1, SHA_B, entry)
    assert cache.get(NS_1, SHA_B) == entry


def test_many_threads(make_cache: Callable[[], VerdictCache]) -> None:
    cache = make_cache()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(40):
                sha = f"{t:02d}{i:062d}"
                cache.put(NS_1, sha, _entry(i / 100))
                assert cache.get(NS_1, sha) == _entry(i / 100)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    for t in range(8):
        for i in range(40):
            assert cache.get(NS_1, f"{t:02d}{i:062d}") == _entry(i / 100)


def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "verdicts.sqlite3"
    first = SQLiteCache(path)
    first.put(NS_1, SHA_A, _entry(0.42, frames=5))
    first.close()
    assert path.is_file()
    second = SQLiteCache(path)
    try:
        assert second.get(NS_1, SHA_A) == _entry(0.42, frames=5)
        assert second.get(NS_2, SHA_A) is None
    finally:
        second.close()


def test_sqlite_two_open_handles_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.sqlite3"
    writer, reader = SQLiteCache(path), SQLiteCache(path)
    try:
        writer.put(NS_1, SHA_B, _entry(0.3))
        assert reader.get(NS_1, SHA_B) == _entry(0.3)
    finally:
        writer.close()
        reader.close()


def test_cached_entry_json_roundtrip() -> None:
    entry = _entry(0.25, frames=2)
    assert CachedEntry.from_json(entry.to_json()) == entry


# --- policy -----------------------------------------------------------------------------------


def _card(review_at: float, block_at: float) -> ModelCard:
    return ModelCard(
        id="test/model",
        revision="r1",
        runtime="onnx",
        labels=("sfw", "nsfw"),
        input_size=224,
        crop="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        embedding_dim=None,
        extra={"review_at": review_at, "block_at": block_at},
    )


SEVERITY = {Verdict.ALLOW: 0, Verdict.REVIEW: 1, Verdict.BLOCK: 2}
SCORES = [i / 200 for i in range(201)]


@pytest.mark.parametrize(
    ("score", "verdict"),
    [
        (0.0, Verdict.ALLOW),
        (0.2999, Verdict.ALLOW),
        (0.3, Verdict.REVIEW),
        (0.6999, Verdict.REVIEW),
        (0.7, Verdict.BLOCK),
        (1.0, Verdict.BLOCK),
    ],
)
def test_decide_thresholds(score: float, verdict: Verdict) -> None:
    assert Policy("p", review_at=0.3, block_at=0.7).decide(score) is verdict


def test_decide_with_equal_thresholds_never_reviews() -> None:
    policy = Policy("p", 0.5, 0.5)
    assert {policy.decide(s) for s in SCORES} == {Verdict.ALLOW, Verdict.BLOCK}


def test_block_at_zero_blocks_everything() -> None:
    policy = Policy("all", 0.0, 0.0)
    assert {policy.decide(s) for s in SCORES} == {Verdict.BLOCK}


@pytest.mark.parametrize(("review", "block"), [(0.2, 0.8), (0.5, 0.85), (0.2, 0.5), (0.0, 1.0)])
def test_named_policies_are_ordered(review: float, block: float) -> None:
    card = _card(review, block)
    policies = {name: load_policy(name, card) for name in POLICY_NAMES}
    assert policies["default"] == Policy("default", review, block)
    for name, policy in policies.items():
        assert policy.name == name
    for score in SCORES:
        strict = SEVERITY[policies["strict"].decide(score)]
        default = SEVERITY[policies["default"].decide(score)]
        lenient = SEVERITY[policies["lenient"].decide(score)]
        assert strict >= default >= lenient, score


def test_strict_and_lenient_really_differ_from_default() -> None:
    card = _card(0.5, 0.85)
    verdicts = {name: [load_policy(name, card).decide(s) for s in SCORES] for name in POLICY_NAMES}
    assert verdicts["strict"] != verdicts["default"] != verdicts["lenient"]


def test_policy_json_file(tmp_path: Path) -> None:
    path = tmp_path / "house.json"
    path.write_text(json.dumps({"name": "house", "review_at": 0.1, "block_at": 0.4}))
    policy = load_policy(str(path), _card(0.5, 0.85))
    assert policy == Policy("house", 0.1, 0.4)
    assert policy.decide(0.05) is Verdict.ALLOW
    assert policy.decide(0.2) is Verdict.REVIEW
    assert policy.decide(0.4) is Verdict.BLOCK


def test_policy_json_file_name_defaults_to_stem(tmp_path: Path) -> None:
    path = tmp_path / "blocky.json"
    path.write_text(json.dumps({"review_at": 0.0, "block_at": 0.0}))
    assert load_policy(str(path), _card(0.5, 0.85)) == Policy("blocky", 0.0, 0.0)


@pytest.mark.parametrize(
    ("review", "block"),
    [(0.9, 0.5), (-0.1, 0.5), (0.2, 1.5), (float("nan"), 0.5), (0.2, float("inf"))],
)
def test_invalid_thresholds_raise_config_error(review: float, block: float) -> None:
    with pytest.raises(ConfigError) as info:
        Policy("bad", review, block)
    assert info.value.code == "config"


@pytest.mark.parametrize(
    "content",
    [
        '{"review_at": 0.9, "block_at": 0.1}',  # out of order
        '{"review_at": 0.2}',  # missing block_at
        '{"review_at": "low", "block_at": 0.8}',  # not a number
        '{"review_at": null, "block_at": 0.8}',
        "not json at all",
        "[0.2, 0.8]",  # valid JSON, but not an object
    ],
)
def test_invalid_policy_files_raise_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_policy(str(path), _card(0.5, 0.85))


def test_unknown_policy_name_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_policy("paranoid", _card(0.5, 0.85))
    with pytest.raises(ConfigError):
        load_policy(str(tmp_path / "missing.json"), _card(0.5, 0.85))
