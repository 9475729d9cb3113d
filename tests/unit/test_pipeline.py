"""The pipeline end to end in-process, with the real bundled open_nsfw model."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from worker.actions import Actions
from worker.cache import MemoryCache, SQLiteCache
from worker.decode import DecodeLimits, decode
from worker.hashing import HASH_VERSION
from worker.messages import CacheOutcome, ModerationResult, Status, Verdict
from worker.models.backend import Backend
from worker.models.factory import create_backend
from worker.models.preprocess import draft_size
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy, load_policy
from worker.quarantine import LocalQuarantine
from worker.storage import LocalStore, MemoryStore, file_ref

BLOCK_ALL = Policy("block-all", 0.0, 0.0)


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _scene(width: int, height: int, seed: int) -> Image.Image:
    """A varied synthetic picture: gradient background, shapes, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            120 + 90 * np.sin(x / (13 + seed)),
            110 + 80 * np.cos(y / (17 + seed)),
            255 * x / width,
        ],
        axis=-1,
    )
    image = Image.fromarray(np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + 40), fill=color)
    return image


@pytest.fixture(scope="module")
def backend() -> Backend:
    return create_backend("opennsfw")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    files = {
        "photo.jpg": _encode(_scene(640, 480, 1), "JPEG", quality=90),
        "portrait.png": _encode(_scene(300, 420, 2), "PNG"),
        "small.webp": _encode(_scene(200, 150, 3), "WEBP"),
        "wide.jpg": _encode(_scene(900, 300, 4), "JPEG"),
        "corrupt.jpg": _encode(_scene(320, 240, 5), "JPEG")[:1500],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture
def animated(tmp_path: Path) -> Path:
    frames = [_scene(160, 120, seed) for seed in range(10, 22)]  # 12 different frames
    path = tmp_path / "images" / "anim.gif"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80)
    )
    return path


def _pipeline(
    backend: Backend,
    root: Path,
    policy: Policy | None = None,
    **kwargs: Any,
) -> Pipeline:
    options = kwargs.pop("options", PipelineOptions(max_wait_ms=5))
    return Pipeline(
        backend,
        LocalStore([root]),
        policy or load_policy("default", backend.card),
        options=options,
        **kwargs,
    )


@pytest.fixture
def counting(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spies on the shared backend: the batch size of every forward pass it runs."""
    sizes: list[int] = []
    forward = backend.forward

    def spy(batch: np.ndarray, embed: bool = False) -> Any:
        sizes.append(len(batch))
        return forward(batch, embed)

    monkeypatch.setattr(backend, "forward", spy)
    return sizes


def _by_name(results: Iterable[ModerationResult]) -> dict[str, ModerationResult]:
    return {Path(r.image).name: r for r in results}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_good_images_and_a_corrupt_one(backend: Backend, images: dict[str, Path]) -> None:
    root = images["photo.jpg"].parent
    missing = root / "missing.jpg"
    refs = [file_ref(p) for p in images.values()] + [file_ref(missing)]
    with _pipeline(backend, root, cache=MemoryCache()) as pipeline:
        results = _by_name(pipeline.process_many(refs, concurrency=4))
    assert set(results) == {*images, "missing.jpg"}

    bad = results.pop("corrupt.jpg")
    assert bad.status is Status.ERROR
    assert bad.error is not None and bad.error.code == "corrupt_image"
    assert not bad.error.retryable
    assert bad.verdict is None and bad.nsfw_score is None and bad.scores == {}
    gone = results.pop("missing.jpg")
    assert gone.status is Status.ERROR and gone.error is not None
    assert gone.error.code == "not_found"

    policy = load_policy("default", backend.card)
    for name, result in results.items():
        assert result.status is Status.OK, (name, result.error)
        assert result.error is None
        assert set(result.scores) == {"sfw", "nsfw"}
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert all(0.0 <= p <= 1.0 for p in result.scores.values())
        assert result.nsfw_score == pytest.approx(result.scores["nsfw"])
        assert result.verdict is policy.decide(result.nsfw_score)
        assert result.frames == 1
        assert result.hashes is not None
        assert result.hashes.sha256 == _sha(images[name])
        assert result.hashes.phash and len(result.hashes.phash) == 16
        assert result.hashes.dhash and len(result.hashes.dhash) == 16
        assert result.cache is not None and result.cache.outcome is CacheOutcome.MISS
        assert result.model is not None and result.model.id == backend.card.id
        assert result.model.revision == backend.card.revision
        assert result.action is not None and result.action.kind == "none"
        assert result.timings.decode_ms > 0
        assert result.timings.infer_ms > 0
        assert result.timings.total_ms >= result.timings.infer_ms
        # The wire contract round-trips.
        assert ModerationResult.model_validate_json(result.model_dump_json()) == result
    # Different pictures, different scores: the results are not all one value.
    assert len({r.hashes.phash for r in results.values() if r.hashes}) == len(results)


def test_scores_match_the_backend_called_directly(
    backend: Backend, images: dict[str, Path]
) -> None:
    root = images["photo.jpg"].parent
    limits = DecodeLimits()
    with _pipeline(backend, root) as pipeline:
        for name in ("photo.jpg", "portrait.png", "wide.jpg"):
            result = pipeline.process(file_ref(images[name]), request_id=f"req-{name}")
            assert result.request_id == f"req-{name}"
            decoded = decode(images[name].read_bytes(), limits, draft_size(backend.card))
            direct = backend.predict(list(decoded.frames))[0].scores
            assert result.nsfw_score == pytest.approx(direct.nsfw_score, abs=1e-5)
            assert result.scores == pytest.approx(direct.probabilities, abs=1e-5)


def test_second_run_hits_the_cache_without_decoding(
    backend: Backend, images: dict[str, Path], counting: list[int]
) -> None:
    root = images["photo.jpg"].parent
    good = [p for name, p in images.items() if name != "corrupt.jpg"]
    cache = MemoryCache()
    with _pipeline(backend, root, cache=cache) as pipeline:
        first = _by_name(pipeline.process_many([file_ref(p) for p in good], concurrency=2))
    forwards_after_first = sum(counting)
    assert forwards_after_first == len(good)
    assert len(cache) == len(good)

    with _pipeline(backend, root, cache=cache) as pipeline:
        second = _by_name(pipeline.process_many([file_ref(p) for p in good], concurrency=2))
    assert sum(counting) == forwards_after_first  # no image reached the model again
    for name, result in second.items():
        before = first[name]
        assert result.status is Status.OK
        assert result.cache is not None and result.cache.outcome is CacheOutcome.EXACT
        assert result.scores == before.scores
        assert result.nsfw_score == before.nsfw_score
        assert result.verdict is before.verdict
        assert result.hashes == before.hashes
        assert result.frames == before.frames
        assert result.timings.decode_ms == 0.0  # no decode happened
        assert result.timings.infer_ms == 0.0


def test_cache_hit_needs_the_same_bytes(backend: Backend, images: dict[str, Path]) -> None:
    root = images["photo.jpg"].parent
    cache = MemoryCache()
    path = images["photo.jpg"]
    with _pipeline(backend, root, cache=cache) as pipeline:
        assert pipeline.process(file_ref(path)).cache.outcome is CacheOutcome.MISS  # type: ignore[union-attr]
        path.write_bytes(path.read_bytes() + b"\x00")  # trailing byte: other sha256
        again = pipeline.process(file_ref(path))
    assert again.cache is not None and again.cache.outcome is CacheOutcome.MISS


def test_sqlite_cache_serves_a_new_pipeline(
    backend: Backend, images: dict[str, Path], tmp_path: Path
) -> None:
    root = images["photo.jpg"].parent
    ref = file_ref(images["portrait.png"])
    db = tmp_path / "cache" / "verdicts.sqlite3"
    first_cache = SQLiteCache(db)
    with _pipeline(backend, root, cache=first_cache) as pipeline:
        first = pipeline.process(ref)
    first_cache.close()
    second_cache = SQLiteCache(db)
    try:
        with _pipeline(backend, root, cache=second_cache) as pipeline:
            second = pipeline.process(ref)
    finally:
        second_cache.close()
    assert first.cache is not None and first.cache.outcome is CacheOutcome.MISS
    assert second.cache is not None and second.cache.outcome is CacheOutcome.EXACT
    assert second.scores == first.scores


def test_no_cache_reports_disabled(backend: Backend) -> None:
    data = _encode(_scene(128, 96, 7), "PNG")
    store = MemoryStore({"mem://a.png": data})
    with Pipeline(backend, store, BLOCK_ALL, options=PipelineOptions(max_wait_ms=1)) as pipeline:
        result = pipeline.process("mem://a.png")
    assert result.status is Status.OK
    assert result.cache is not None and result.cache.outcome is CacheOutcome.DISABLED
    assert result.verdict is Verdict.BLOCK
    assert result.action is not None and result.action.kind == "none"  # no quarantine wired


def test_block_verdict_moves_the_file_to_quarantine(
    backend: Backend, images: dict[str, Path], tmp_path: Path
) -> None:
    root = images["photo.jpg"].parent
    store = LocalStore([root])
    quarantine = LocalQuarantine(tmp_path / "quarantine", store)
    source = images["photo.jpg"]
    data, sha = source.read_bytes(), _sha(source)
    with Pipeline(
        backend,
        store,
        BLOCK_ALL,
        actions=Actions(quarantine=quarantine),
        options=PipelineOptions(max_wait_ms=1),
    ) as pipeline:
        result = pipeline.process(file_ref(source), request_id="req-1")
    assert result.status is Status.OK, result.error
    assert result.verdict is Verdict.BLOCK
    assert result.action is not None and result.action.kind == "quarantine_move"
    assert result.action.location is not None
    moved = Path(result.action.location)
    assert moved.parent == tmp_path / "quarantine"
    assert moved.read_bytes() == data
    assert not source.exists()
    record = json.loads(moved.with_name(moved.name + ".json").read_text())
    assert record["verdict"] == "block"
    assert record["request_id"] == "req-1"
    assert record["sha256"] == sha
    assert record["nsfw_score"] == pytest.approx(result.nsfw_score)


def test_block_on_a_cache_hit_still_quarantines(
    backend: Backend, images: dict[str, Path], tmp_path: Path
) -> None:
    root = images["photo.jpg"].parent
    cache = MemoryCache()
    source = images["wide.jpg"]
    data = source.read_bytes()
    with _pipeline(backend, root, cache=cache) as pipeline:
        pipeline.process(file_ref(source))
    store = LocalStore([root])
    quarantine = LocalQuarantine(tmp_path / "q", store)
    with Pipeline(
        backend,
        store,
        BLOCK_ALL,
        cache=cache,
        actions=Actions(quarantine=quarantine),
        options=PipelineOptions(max_wait_ms=1),
    ) as pipeline:
        result = pipeline.process(file_ref(source))
    assert result.cache is not None and result.cache.outcome is CacheOutcome.EXACT
    assert result.action is not None and result.action.kind == "quarantine_move"
    assert not source.exists()
    assert Path(result.action.location or "").read_bytes() == data


def test_animated_gif_scores_its_worst_sampled_frame(backend: Backend, animated: Path) -> None:
    limits = DecodeLimits(sample_frames=8)
    options = PipelineOptions(limits=limits, max_wait_ms=5)
    with _pipeline(backend, animated.parent, options=options) as pipeline:
        result = pipeline.process(file_ref(animated))
    assert result.status is Status.OK, result.error
    decoded = decode(animated.read_bytes(), limits)
    assert decoded.frame_count == 12
    assert result.frames == len(decoded.frames) == 8
    per_frame = [backend.predict([frame])[0].scores.nsfw_score for frame in decoded.frames]
    assert len(set(per_frame)) > 1  # the frames really score differently
    assert result.nsfw_score == pytest.approx(max(per_frame), abs=1e-5)
    worst = int(np.argmax(per_frame))
    worst_probabilities = backend.predict([decoded.frames[worst]])[0].scores.probabilities
    assert result.scores == pytest.approx(worst_probabilities, abs=1e-5)


def test_exact_decode_and_draft_use_different_namespaces(
    backend: Backend, images: dict[str, Path]
) -> None:
    root = images["photo.jpg"].parent
    cache = MemoryCache()
    # A JPEG large enough for the draft decode to actually shrink it.
    large = root / "large.jpg"
    large.write_bytes(_encode(_scene(400, 300, 9).resize((2400, 1800)), "JPEG"))
    ref = file_ref(large)
    draft = _pipeline(backend, root, cache=cache)
    exact = _pipeline(
        backend, root, cache=cache, options=PipelineOptions(exact_decode=True, max_wait_ms=5)
    )
    try:
        assert draft.namespace != exact.namespace
        assert draft.namespace.startswith(backend.card.cache_namespace)
        assert exact.namespace.startswith(backend.card.cache_namespace)
        first = draft.process(ref)
        other = exact.process(ref)
        again = exact.process(ref)
    finally:
        draft.close()
        exact.close()
    assert first.cache is not None and first.cache.outcome is CacheOutcome.MISS
    assert other.cache is not None and other.cache.outcome is CacheOutcome.MISS  # not shared
    assert again.cache is not None and again.cache.outcome is CacheOutcome.EXACT
    assert len(cache) == 2
    # Both decodes score the same picture, so the scores stay close (not necessarily equal).
    assert first.nsfw_score == pytest.approx(other.nsfw_score, abs=0.1)


def test_embedding(backend: Backend) -> None:
    store = MemoryStore({"mem://a.png": _encode(_scene(160, 120, 8), "PNG")})
    cache = MemoryCache()
    options = PipelineOptions(embed=True, max_wait_ms=1)
    with Pipeline(backend, store, BLOCK_ALL, cache=cache, options=options) as pipeline:
        first = pipeline.process("mem://a.png")
        second = pipeline.process("mem://a.png")
    assert first.embedding is not None
    assert len(first.embedding) == backend.card.embedding_dim
    assert np.isfinite(first.embedding).all()
    # An embedding is never served from the cache (it is not stored there).
    assert second.embedding is not None
    assert second.cache is not None and second.cache.outcome is not CacheOutcome.EXACT


def test_errors_carry_their_codes(backend: Backend, tmp_path: Path) -> None:
    good = _encode(_scene(128, 96, 6), "PNG")
    store = MemoryStore(
        {
            "mem://empty": b"",
            "mem://text": b"just some text, not an image",
            "mem://big": good,
            "mem://good": good,
        }
    )
    options = PipelineOptions(limits=DecodeLimits(max_bytes=len(good) - 1), max_wait_ms=1)
    with Pipeline(backend, store, BLOCK_ALL, options=options) as pipeline:
        results = {
            r.image: r
            for r in pipeline.process_many(
                ["mem://empty", "mem://text", "mem://big", "mem://nothing"], concurrency=2
            )
        }
    codes = {ref: r.error.code if r.error else None for ref, r in results.items()}
    assert codes == {
        "mem://empty": "empty_image",
        "mem://text": "unsupported_format",
        "mem://big": "image_too_large",
        "mem://nothing": "not_found",
    }
    assert all(r.status is Status.ERROR and r.model is not None for r in results.values())


def test_process_many_runs_everything_once(backend: Backend) -> None:
    objects = {f"mem://{i}.png": _encode(_scene(96, 72, 30 + i), "PNG") for i in range(20)}
    store = MemoryStore(objects)
    with Pipeline(backend, store, BLOCK_ALL, options=PipelineOptions(max_wait_ms=20)) as pipeline:
        results = list(pipeline.process_many(objects, concurrency=3))
    assert sorted(r.image for r in results) == sorted(objects)
    assert all(r.status is Status.OK for r in results)
    assert len({r.request_id for r in results}) == len(results)


def test_entries_hashed_another_way_are_never_read(
    backend: Backend, images: dict[str, Path]
) -> None:
    """The hash method's version is in every key: an entry written before the perceptual
    hashes were taken from the reduced frame (no ``/h2``) is neither an exact nor a
    perceptual match, and the model runs."""
    root = images["photo.jpg"].parent
    cache = MemoryCache()
    ref = file_ref(images["photo.jpg"])
    with _pipeline(backend, root, cache=cache) as pipeline:
        assert pipeline.namespace.endswith(f"/h{HASH_VERSION}")
        first = pipeline.process(ref)
        assert first.hashes is not None and first.nsfw_score is not None
        old = pipeline.namespace.removesuffix(f"/h{HASH_VERSION}")
        entry = cache.get(pipeline.namespace, first.hashes.sha256)
        assert entry is not None
        stale = dataclasses.replace(entry, probabilities={"sfw": 0.0, "nsfw": 1.0})
        cache.put(old, first.hashes.sha256, stale)
        cache.put(pipeline.namespace, first.hashes.sha256, stale)
        assert pipeline.process(ref).nsfw_score == 1.0  # this version's key is read
    with _pipeline(backend, root, cache=MemoryCache()) as fresh:
        fresh.cache.put(old, first.hashes.sha256, stale)  # type: ignore[union-attr]
        result = fresh.process(ref)
    assert result.cache is not None and result.cache.outcome is CacheOutcome.MISS
    assert result.nsfw_score == pytest.approx(first.nsfw_score)
