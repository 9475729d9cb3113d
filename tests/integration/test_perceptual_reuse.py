"""A cache never lowers a verdict: a perceptual match lends only a block.

A near match is another image, so its cached score may only answer for this one when no model
run on this one could answer worse, and only block is that. Each case below is a real pair of
near-duplicates (a grey picture, and the same picture tinted, cropped and recompressed: pHash
within the radius): the grey one's entry is seeded in the cache with a score just below, at or
just above a threshold of the policy in force, and the tinted one is scored by a deterministic
model (``TintBackend``) into each band of that policy. For every policy (default, strict,
lenient, a policy file, each given per request) the answer must never be less severe than the
model's own verdict on the new image, and must be the cached block when the entry blocks.
The class runs through the in-memory fake, SQLite (``modq scan``'s cache) and Redis (the
worker's, on a redis-server this module starts), then once with the bundled open_nsfw model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from PIL import Image
from structlog.testing import capture_logs

from tests.conftest import Observe
from tests.support.near_duplicates import (
    TintBackend,
    encode,
    grey_texture,
    hashes,
    own_score,
    skin_pair,
    tinted,
)
from tests.support.redis_server import RedisServer
from worker.cache import CachedEntry, MemoryCache, RedisCache, SQLiteCache, VerdictCache
from worker.config import Settings
from worker.hashing import ImageHashes
from worker.hashing.mih import hamming
from worker.hashing.phash_index import parse_hash
from worker.messages import CacheOutcome, ModerationResult, Status, Verdict
from worker.models.backend import Backend
from worker.models.factory import create_backend
from worker.pipeline import PerceptualOptions, Pipeline, PipelineOptions
from worker.policy import Policy, load_policy
from worker.storage import MemoryStore

RADIUS = Settings.model_fields["perceptual_radius"].default
SEVERITY = {Verdict.ALLOW: 0, Verdict.REVIEW: 1, Verdict.BLOCK: 2}
POLICIES = ("default", "strict", "lenient", "house.json")
HOUSE = {"name": "house", "review_at": 0.35, "block_at": 0.6}
THRESHOLDS = ("review_at", "block_at")
SIDES = {"just below": -1e-6, "at": 0.0, "just above": 1e-6}
CACHED = "mem://cached.png"
NEW = "mem://new.jpg"

SCENARIOS = {
    "sqlite": ("cache.near_never_lowers_sqlite", "SQLite (`modq scan`)"),
    "redis": ("cache.near_never_lowers_redis", "Redis (worker)"),
}

OpenCache = Callable[[], VerdictCache]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenCache]:
    """Opens a new, empty cache on every call, as ``modq scan`` (SQLite) or the worker
    (Redis, under a prefix of its own) wires it from its settings."""
    kind = str(request.param)
    url = str(request.getfixturevalue("redis_url")) if kind == "redis" else ""
    closers: list[Callable[[], None]] = []

    def factory() -> VerdictCache:
        if kind == "memory":
            return MemoryCache()
        if kind == "sqlite":
            lite = SQLiteCache(tmp_path / f"{uuid.uuid4().hex}.sqlite3", RADIUS)
            closers.append(lite.close)
            return lite
        settings = Settings(cache_url=url, cache_prefix=f"t{uuid.uuid4().hex[:10]}")
        shared = RedisCache.from_settings(settings.cache)
        closers.append(shared.close)
        return shared

    yield factory
    for close in closers:
        close()


@pytest.fixture(scope="module")
def tint() -> Backend:
    return TintBackend()


def _policy(name: str, backend: Backend, folder: Path) -> Policy:
    if name.endswith(".json"):
        path = folder / name
        path.write_text(json.dumps(HOUSE))
        return load_policy(str(path), backend.card)
    return load_policy(name, backend.card)


# --- the pairs --------------------------------------------------------------------------------


def _reupload(image: Image.Image) -> bytes:
    """A near-duplicate as uploads make them: borders cropped, scaled down, JPEG q80."""
    side = image.width
    return encode(image.crop((6, 6, side - 6, side - 6)).resize((200, 200)), "JPEG", quality=80)


@cache
def _cached_image() -> bytes:
    return encode(grey_texture(0))


@cache
def _new_image(score: float) -> bytes:
    return _reupload(tinted(grey_texture(0), score))


def _band_target(policy: Policy, band: Verdict) -> float:
    """The middle of ``band`` under ``policy``: where the new image's own score is put."""
    return {
        Verdict.ALLOW: policy.review_at / 2,
        Verdict.REVIEW: (policy.review_at + policy.block_at) / 2,
        Verdict.BLOCK: (policy.block_at + 1.0) / 2,
    }[band]


def _distance(a: str | None, b: str | None) -> int:
    assert a is not None and b is not None
    return hamming(parse_hash(a), parse_hash(b))


def _seed(pipeline: Pipeline, cache_: VerdictCache, hashes_: ImageHashes, nsfw: float) -> None:
    """What an earlier classification of the cached image leaves behind, with a chosen score."""
    assert pipeline.backend.card.labels == ("sfw", "nsfw")
    entry = CachedEntry(
        {"sfw": 1.0 - nsfw, "nsfw": nsfw}, 1, hashes_.phash, hashes_.dhash, hashes_.informative
    )
    cache_.put(pipeline.namespace, hashes_.sha256, entry)


def _pipeline(backend: Backend, cache_: VerdictCache, files: dict[str, bytes]) -> Pipeline:
    return Pipeline(
        backend,
        MemoryStore(files),
        load_policy("default", backend.card),  # each request below names its own policy
        cache=cache_,
        options=PipelineOptions(max_wait_ms=1),
        perceptual=PerceptualOptions(radius=RADIUS),
    )


def _outcome(result: ModerationResult) -> tuple[CacheOutcome, int | None]:
    assert result.status is Status.OK, result.error
    assert result.cache is not None
    return result.cache.outcome, result.cache.distance


@dataclass(frozen=True)
class Case:
    policy: Policy
    threshold: str
    side: str
    band: Verdict

    @property
    def cached_score(self) -> float:
        return float(getattr(self.policy, self.threshold)) + SIDES[self.side]

    def __str__(self) -> str:
        return (
            f"{self.policy.name}: cached {self.side} {self.threshold} "
            f"({self.cached_score:.6f}), own score in {self.band.value}"
        )


@dataclass(frozen=True)
class Answer:
    case: Case
    own: Verdict
    result: ModerationResult
    distance: int


def _answer(case: Case, backend: Backend, open_cache: OpenCache) -> Answer:
    """One near-duplicate pair through a fresh cache and the pipeline; checks that the pair
    is what the case says (near by pHash, own score in the band, the entry offered)."""
    old, new = _cached_image(), _new_image(_band_target(case.policy, case.band))
    cached, query = hashes(backend, old), hashes(backend, new)
    distance = _distance(cached.phash, query.phash)
    assert cached.sha256 != query.sha256 and cached.informative and query.informative
    assert distance <= RADIUS, case
    own = case.policy.decide(own_score(backend, new))
    assert own is case.band, case
    store = open_cache()
    with _pipeline(backend, store, {CACHED: old, NEW: new}) as pipeline:
        _seed(pipeline, store, cached, case.cached_score)
        # The cache does offer the entry: what follows is the reuse rule, not a lookup miss.
        offered = store.near(pipeline.namespace, query.phash, query.dhash, RADIUS)
        assert [m.sha256 for m in offered] == [cached.sha256], case
        result = pipeline.process(NEW, policy=case.policy)
    return Answer(case, own, result, distance)


def _problems(answer: Answer, backend: Backend) -> list[str]:
    """What is wrong with one answer, in words (nothing when it keeps the rule)."""
    case, result = answer.case, answer.result
    problems = []
    if result.verdict is None or SEVERITY[result.verdict] < SEVERITY[answer.own]:
        problems.append(f"answered {result.verdict} below the model's own {answer.own.value}")
    if case.policy.decide(case.cached_score) is Verdict.BLOCK:
        expected = (CacheOutcome.PERCEPTUAL, answer.distance)
        if _outcome(result) != expected or result.nsfw_score != case.cached_score:
            problems.append(f"a blocking entry was not reused: {_outcome(result)}")
        if result.verdict is not Verdict.BLOCK:
            problems.append(f"reused a block, answered {result.verdict}")
    else:
        own = own_score(backend, _new_image(_band_target(case.policy, case.band)))
        if _outcome(result) != (CacheOutcome.MISS, None):
            problems.append(f"a non-blocking entry lent its score: {_outcome(result)}")
        if result.nsfw_score is None or abs(result.nsfw_score - own) > 1e-6:
            problems.append(f"score {result.nsfw_score}, the model's own {own}")
        if result.verdict is not answer.own:
            problems.append(f"verdict {result.verdict}, the model's own {answer.own.value}")
    return [f"{case}: {p}" for p in problems]


def _every_case(backend: Backend, folder: Path) -> list[Case]:
    return [
        Case(_policy(name, backend, folder), threshold, side, band)
        for name in POLICIES
        for threshold in THRESHOLDS
        for side in SIDES
        for band in SEVERITY
    ]


# --- the class, in every cache ------------------------------------------------------------


@pytest.mark.reliability
def test_a_near_match_never_answers_below_the_images_own_verdict(
    request: pytest.FixtureRequest,
    tint: Backend,
    open_cache: OpenCache,
    tmp_path: Path,
    observe: Observe,
) -> None:
    answers = [_answer(case, tint, open_cache) for case in _every_case(tint, tmp_path)]
    problems = [p for answer in answers for p in _problems(answer, tint)]
    assert not problems, "\n".join(problems)

    reused = [a for a in answers if _outcome(a.result)[0] is CacheOutcome.PERCEPTUAL]
    classified = [a for a in answers if _outcome(a.result)[0] is CacheOutcome.MISS]
    # Both sides of every threshold were crossed: blocks reused, everything else classified,
    # and among the classified, images that outrank their cached neighbour.
    assert len(reused) + len(classified) == len(answers) == 72
    assert {a.case.policy.name for a in reused} == {"default", "strict", "lenient", "house"}
    raised = [
        a
        for a in classified
        if SEVERITY[a.own] > SEVERITY[a.case.policy.decide(a.case.cached_score)]
    ]
    assert raised and all(a.result.verdict is a.own for a in raised)
    kind = request.node.callspec.params["open_cache"]
    if kind not in SCENARIOS:
        return  # the in-memory fake: no row of its own
    scenario, where = SCENARIOS[kind]
    distances = sorted({a.distance for a in answers})
    observe(
        scenario,
        f"{where}: {len(answers)} near-duplicate pairs (pHash distance {distances}), cached "
        f"score just below / at / just above review_at and block_at of the default, strict, "
        f"lenient and a file policy, own score in each band: {len(reused)} reused a cached "
        f"block (`perceptual`), {len(classified)} classified by the model, {len(raised)} of "
        f"them more severe than their cached neighbour; none answered below the model's own "
        f"verdict",
        sent=len(answers),
        received=sum(a.result.status is Status.OK for a in answers),
        lost=sum(a.result.status is not Status.OK for a in answers),
    )


def test_an_embedding_request_runs_the_model_even_beside_a_block(tint: Backend) -> None:
    memory = MemoryCache()
    old, new = _cached_image(), _new_image(0.1)
    with _pipeline(tint, memory, {CACHED: old, NEW: new}) as pipeline:
        _seed(pipeline, memory, hashes(tint, old), 0.99)
        plain = pipeline.process(NEW)
        embedded = pipeline.process(NEW, embed=True)
    assert _outcome(plain)[0] is CacheOutcome.PERCEPTUAL and plain.verdict is Verdict.BLOCK
    # The cache keeps no embeddings, so the model runs and its own verdict stands.
    assert _outcome(embedded) == (CacheOutcome.MISS, None) and embedded.embedding is not None
    assert embedded.nsfw_score == pytest.approx(own_score(tint, new), abs=1e-6)
    assert embedded.verdict is Verdict.ALLOW


def test_the_old_safe_reuse_option_is_accepted_warned_about_and_reuses_nothing(
    tint: Backend,
) -> None:
    settings = Settings(perceptual_reuse_safe=True)
    with capture_logs() as logs:
        options = PerceptualOptions.from_settings(settings.cache)
    assert options == PerceptualOptions(radius=settings.perceptual_radius)
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert len(warned) == 1 and "MODQ_PERCEPTUAL_REUSE_SAFE" in warned[0]["event"]
    with capture_logs() as quiet:
        PerceptualOptions.from_settings(Settings(perceptual_reuse_safe=False).cache)
    assert quiet == []

    memory = MemoryCache()
    old, new = _cached_image(), _new_image(0.5)  # own score: review under the default policy
    cached, query = hashes(tint, old), hashes(tint, new)
    # What the option used to demand, pHash and dHash both within the radius, holds here.
    assert _distance(cached.dhash, query.dhash) <= RADIUS
    files = {CACHED: old, NEW: new}
    with Pipeline(
        tint,
        MemoryStore(files),
        load_policy("default", tint.card),
        cache=memory,
        options=PipelineOptions(max_wait_ms=1),
        perceptual=options,
    ) as pipeline:
        _seed(pipeline, memory, cached, 0.01)
        result = pipeline.process(NEW)
    assert _outcome(result) == (CacheOutcome.MISS, None)
    assert result.verdict is Verdict.REVIEW


# --- the bundled model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def opennsfw() -> Backend:
    return create_backend("opennsfw")


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_open_nsfw_a_review_neighbour_never_launders_a_block(
    kind: str, opennsfw: Backend, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The issue's case with real scores: an image the model scores above its cached
    near-duplicate, with a policy file whose thresholds fall between the two scores."""
    grey, skin = skin_pair()
    low, high = own_score(opennsfw, grey), own_score(opennsfw, skin)
    assert high - low > 0.02, (low, high)
    assert _distance(hashes(opennsfw, grey).phash, hashes(opennsfw, skin).phash) <= RADIUS
    policy = Policy("between", low / 2, (low + high) / 2)

    def open_one() -> SQLiteCache | RedisCache:
        if kind == "sqlite":
            return SQLiteCache(tmp_path / f"{uuid.uuid4().hex}.sqlite3", RADIUS)
        url = str(request.getfixturevalue("redis_url"))
        prefix = f"t{uuid.uuid4().hex[:10]}"
        return RedisCache.from_settings(Settings(cache_url=url, cache_prefix=prefix).cache)

    files = {"mem://grey.png": grey, "mem://skin.jpg": skin}
    first, second = open_one(), open_one()
    try:
        with _pipeline(opennsfw, first, files) as pipeline:
            review = pipeline.process("mem://grey.png", policy=policy)
            block = pipeline.process("mem://skin.jpg", policy=policy)
        with _pipeline(opennsfw, second, files) as pipeline:
            blocked_first = pipeline.process("mem://skin.jpg", policy=policy)
            neighbour = pipeline.process("mem://grey.png", policy=policy)
    finally:
        for opened in (first, second):
            opened.close()
    assert _outcome(review) == (CacheOutcome.MISS, None) and review.verdict is Verdict.REVIEW
    assert _outcome(block) == (CacheOutcome.MISS, None) and block.verdict is Verdict.BLOCK
    assert block.nsfw_score == pytest.approx(high, abs=1e-5)
    # The other way round, the cached block is lent to its near-duplicate.
    assert _outcome(blocked_first) == (CacheOutcome.MISS, None)
    assert _outcome(neighbour)[0] is CacheOutcome.PERCEPTUAL
    assert neighbour.verdict is Verdict.BLOCK and neighbour.nsfw_score == blocked_first.nsfw_score
