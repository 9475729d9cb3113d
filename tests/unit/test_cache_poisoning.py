"""Cache poisoning: a crafted pHash collision must not inherit a cached safe verdict, while a
near-duplicate of a cached unsafe image inherits its block.

pHash (imagehash's, as modq computes it) reads only the 8x8 lowest DCT coefficients of a 32x32
greyscale thumbnail, so any picture can be given another's pHash: keep the picture and correct
that band alone. Here the cat photo is given the pHash of the brick wall, from the example
photos, and both run through the real pipeline and the bundled open_nsfw model. The verdicts
for the brick wall are seeded with the cache's own ``put``, under its real hashes and in the
pipeline's namespace, as an earlier request would have left them; the seeded scores are ones
the default policy maps to allow or block.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tests.conftest import Observe
from tests.support.corpus import EXAMPLES
from worker.cache import CachedEntry, MemoryCache
from worker.config import Settings
from worker.decode import DecodeLimits, decode
from worker.hashing import ImageHashes, hash_image
from worker.hashing.mih import hamming
from worker.hashing.phash_index import parse_hash
from worker.messages import CacheOutcome, ModerationResult, Status, Verdict
from worker.models.backend import Backend, Scores
from worker.models.factory import create_backend
from worker.models.preprocess import draft_size
from worker.pipeline import PerceptualOptions, Pipeline, PipelineOptions
from worker.policy import Policy, load_policy
from worker.storage import MemoryStore

CACHED = "mem://cached-brick.png"  # the image whose verdict is in the cache
CRAFTED = "mem://crafted-cat.png"  # the cat, corrected to the brick wall's pHash
DUPLICATE = "mem://duplicate-brick.jpg"  # the brick wall re-uploaded: smaller, recompressed

THUMB = 32  # imagehash.phash: greyscale, LANCZOS to 32x32, DCT, top-left 8x8 against median
BAND = 8
# The cat is squeezed into [38, 217] so the band correction (tens of grey levels) is not
# clipped at black or white, which would leave the band short of its target.
CONTRAST, LIFT = 0.7, 38.0
# The correction is made at 32x32, upsampled and measured again through the thumbnail: the two
# resamplings do not invert exactly, and a few rounds land on the target band.
ROUNDS = 3


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _photo(name: str) -> Image.Image:
    with Image.open(EXAMPLES / name) as image:
        return image.convert("RGB")


def _dct_matrix(n: int = THUMB) -> np.ndarray:
    """Orthonormal DCT-II: the band it gives differs from scipy's by per-coefficient scale,
    and equal coefficients give equal pHash bits whatever the scale."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


DCT = _dct_matrix()


def _band(image: Image.Image) -> np.ndarray:
    thumb = image.convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    return (DCT @ np.asarray(thumb, np.float64) @ DCT.T)[:BAND, :BAND]


def _collide(target: Image.Image, shown: Image.Image) -> Image.Image:
    """``shown``, at ``target``'s size, with the low-frequency band pHash reads replaced by
    ``target``'s: every other frequency (all that the eye reads as detail) stays ``shown``'s."""
    pixels = np.asarray(shown.resize(target.size), np.float64) * CONTRAST + LIFT
    goal = _band(target)
    for _ in range(ROUNDS):
        current = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        delta = np.zeros((THUMB, THUMB))
        delta[:BAND, :BAND] = goal - _band(current)
        small = Image.fromarray((DCT.T @ delta @ DCT).astype(np.float32), "F")
        grey = np.asarray(small.resize(target.size, Image.Resampling.BICUBIC), np.float64)
        pixels += grey[..., None]  # the same shift in R, G and B moves only the grey level
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Attack:
    files: dict[str, bytes]
    cached: Image.Image
    crafted: Image.Image
    shown: Image.Image  # the photo the crafted image was made from, at the same size


@pytest.fixture(scope="module")
def attack() -> Attack:
    cached = _photo("brick.jpg")
    shown = _photo("chelsea-cat.jpg").resize(cached.size)
    crafted = _collide(cached, shown)
    small = cached.resize((cached.width * 4 // 5, cached.height * 4 // 5), Image.Resampling.LANCZOS)
    files = {
        CACHED: _encode(cached, "PNG"),
        CRAFTED: _encode(crafted, "PNG"),  # lossless: the pixels hashed are the ones made
        DUPLICATE: _encode(small, "JPEG", quality=70),
    }
    return Attack(files, cached, crafted, shown)


@pytest.fixture(scope="module")
def backend() -> Backend:
    return create_backend("opennsfw")


# --- measuring ----------------------------------------------------------------------------


def _hashes(backend: Backend, data: bytes) -> ImageHashes:
    """The hashes as the pipeline computes them: on the first frame of its (draft) decode."""
    decoded = decode(data, DecodeLimits(), draft_size(backend.card))
    return hash_image(data, decoded.frames[0])


def _distance(a: str, b: str) -> int:
    return hamming(parse_hash(a), parse_hash(b))


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), np.float64)


def _detail(image: Image.Image) -> np.ndarray:
    """The image less its blur: edges and texture, what makes a cat a cat and bricks bricks."""
    grey = image.convert("L")
    return _grey(grey) - _grey(grey.filter(ImageFilter.GaussianBlur(3)))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@dataclass(frozen=True)
class Figures:
    phash_distance: int
    dhash_distance: int
    mean_abs_grey: float  # crafted vs cached, grey levels out of 255
    grey_correlation: float  # crafted vs cached
    detail_vs_cached: float
    detail_vs_shown: float

    def describe(self) -> str:
        return (
            f"pHash distance {self.phash_distance} (dHash {self.dhash_distance}) from the "
            f"cached brick wall, yet it shows the cat: mean |grey difference| "
            f"{self.mean_abs_grey:.0f}/255, grey correlation {self.grey_correlation:.3f}, "
            f"detail correlation {self.detail_vs_cached:.3f} with the bricks and "
            f"{self.detail_vs_shown:.3f} with the cat photo"
        )


def _measure(backend: Backend, attack: Attack, radius: int) -> Figures:
    """The collision is real (within the radius, both images matchable) and the two images
    are not alike to the eye; fails the test otherwise."""
    cached = _hashes(backend, attack.files[CACHED])
    crafted = _hashes(backend, attack.files[CRAFTED])
    figures = Figures(
        _distance(cached.phash, crafted.phash),
        _distance(cached.dhash, crafted.dhash),
        float(np.abs(_grey(attack.crafted) - _grey(attack.cached)).mean()),
        _correlation(_grey(attack.crafted), _grey(attack.cached)),
        _correlation(_detail(attack.crafted), _detail(attack.cached)),
        _correlation(_detail(attack.crafted), _detail(attack.shown)),
    )
    assert figures.phash_distance <= radius, figures
    assert cached.informative and crafted.informative  # flat or tiny images never match
    assert figures.mean_abs_grey > 15, figures
    assert abs(figures.grey_correlation) < 0.2, figures
    assert abs(figures.detail_vs_cached) < 0.2, figures
    assert figures.detail_vs_shown > 0.9, figures
    return figures


# --- the pipeline -------------------------------------------------------------------------


def _shipped_perceptual() -> PerceptualOptions:
    """The perceptual tier as Settings ship it (their defaults, not this machine's env)."""
    options = PerceptualOptions(radius=Settings.model_fields["perceptual_radius"].default)
    assert options.enabled
    return options


@pytest.fixture
def run(backend: Backend, attack: Attack) -> Iterator[tuple[Pipeline, MemoryCache]]:
    cache = MemoryCache()
    pipeline = Pipeline(
        backend,
        MemoryStore(dict(attack.files)),
        load_policy("default", backend.card),
        cache=cache,
        options=PipelineOptions(max_wait_ms=1),
        perceptual=_shipped_perceptual(),
    )
    with pipeline:
        yield pipeline, cache


def _seed(pipeline: Pipeline, cache: MemoryCache, hashes: ImageHashes, nsfw: float) -> None:
    """What a classification of the brick wall leaves behind, with a chosen score."""
    labels = pipeline.backend.card.labels
    assert labels == ("sfw", "nsfw")
    entry = CachedEntry(
        {"sfw": 1.0 - nsfw, "nsfw": nsfw}, 1, hashes.phash, hashes.dhash, hashes.informative
    )
    cache.put(pipeline.namespace, hashes.sha256, entry)


def _direct(backend: Backend, data: bytes) -> Scores:
    """The model's own scores, as test_pipeline checks them: the backend on the decode."""
    decoded = decode(data, DecodeLimits(), draft_size(backend.card))
    return backend.predict(list(decoded.frames))[0].scores


def _outcome(result: ModerationResult) -> tuple[CacheOutcome, int | None]:
    assert result.status is Status.OK, result.error
    assert result.cache is not None
    return result.cache.outcome, result.cache.distance


def _said(result: ModerationResult) -> str:
    """The result's cache outcome and verdict, in words, for the reliability table."""
    outcome, distance = _outcome(result)
    at = "" if distance is None else f" at distance {distance}"
    verdict = result.verdict.value if result.verdict else "none"
    return f"cache `{outcome.value}`{at}, verdict {verdict}"


def _counts(results: tuple[ModerationResult, ...]) -> dict[str, int]:
    ok = sum(r.status is Status.OK for r in results)
    return {"sent": len(results), "received": ok, "lost": len(results) - ok}


@pytest.mark.reliability
def test_collision_with_a_cached_safe_image_is_scored_by_the_model(
    backend: Backend,
    attack: Attack,
    run: tuple[Pipeline, MemoryCache],
    observe: Observe,
) -> None:
    pipeline, cache = run
    policy: Policy = pipeline.policy
    figures = _measure(backend, attack, pipeline.perceptual.radius)
    safe = policy.review_at / 2
    assert policy.decide(safe) is Verdict.ALLOW
    cached = _hashes(backend, attack.files[CACHED])
    crafted = _hashes(backend, attack.files[CRAFTED])
    _seed(pipeline, cache, cached, safe)
    # The cache itself does offer the safe entry for the crafted image: the refusal below is
    # the pipeline's trust rule, not a lookup that found nothing.
    offered = cache.near(pipeline.namespace, crafted.phash, crafted.dhash, figures.phash_distance)
    assert [m.sha256 for m in offered] == [cached.sha256]

    control = pipeline.process(CACHED)  # the seeded entry is the one the pipeline reads
    result = pipeline.process(CRAFTED)
    direct = _direct(backend, attack.files[CRAFTED])

    assert _outcome(control) == (CacheOutcome.EXACT, None)
    assert control.nsfw_score == safe and control.verdict is Verdict.ALLOW
    assert result.hashes is not None and result.hashes.phash == crafted.phash
    assert abs(direct.nsfw_score - safe) > 1e-3  # a reused score would be told apart
    assert _outcome(result) == (CacheOutcome.MISS, None)
    assert result.nsfw_score == pytest.approx(direct.nsfw_score, abs=1e-5)
    assert result.scores == pytest.approx(direct.probabilities, abs=1e-5)
    assert result.verdict is policy.decide(direct.nsfw_score)
    observe(
        "cache.collision_safe",
        f"crafted image: {figures.describe()}. The cache offered the brick wall's safe entry "
        f"(nsfw {safe:.2f}); the pipeline answered {_said(result)}, with the model's own "
        f"score {result.nsfw_score:.4f} (backend on the same image: {direct.nsfw_score:.4f}); "
        f"the brick wall itself: {_said(control)}",
        **_counts((control, result)),
    )


@pytest.mark.reliability
def test_near_duplicate_of_a_cached_unsafe_image_inherits_the_block(
    backend: Backend,
    attack: Attack,
    run: tuple[Pipeline, MemoryCache],
    observe: Observe,
) -> None:
    pipeline, cache = run
    policy: Policy = pipeline.policy
    radius = pipeline.perceptual.radius
    figures = _measure(backend, attack, radius)
    unsafe = policy.block_at + (1.0 - policy.block_at) / 2
    assert policy.decide(unsafe) is Verdict.BLOCK
    cached = _hashes(backend, attack.files[CACHED])
    duplicate = _hashes(backend, attack.files[DUPLICATE])
    assert duplicate.sha256 != cached.sha256 and duplicate.informative
    near = _distance(cached.phash, duplicate.phash)
    assert near <= radius
    _seed(pipeline, cache, cached, unsafe)

    again = pipeline.process(DUPLICATE)
    crafted = pipeline.process(CRAFTED)

    assert _outcome(again) == (CacheOutcome.PERCEPTUAL, near)
    assert again.verdict is Verdict.BLOCK and again.nsfw_score == unsafe
    # Asymmetric trust, by design: the crafted image is within the radius, so it inherits the
    # block too. A false block goes to review; a false allow (the test above) would not.
    assert _outcome(crafted) == (CacheOutcome.PERCEPTUAL, figures.phash_distance)
    assert crafted.verdict is Verdict.BLOCK and crafted.nsfw_score == unsafe
    observe(
        "cache.collision_unsafe",
        f"brick wall cached unsafe (nsfw {unsafe:.2f}); re-uploaded at 80 % size as JPEG q70 "
        f"(other sha256): {_said(again)}. The crafted cat image ({figures.describe()}) got "
        f"{_said(crafted)} too: a false block, by design (reviewable; a false allow is not)",
        **_counts((again, crafted)),
    )
