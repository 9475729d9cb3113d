"""Where an image's scores come from, tried in this order: the known-bad hash banks (a match
blocks, and nothing else runs), the exact cache tier, then a decode and the perceptual tier,
then the model through the dynamic batcher. ``ScoreLookup.find`` returns what was found and
where; the pipeline turns it into a result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from worker.banks.base import BankMatch
from worker.banks.gate import BankGate
from worker.batching import DynamicBatcher
from worker.cache import CachedEntry, NearMatch, VerdictCache, choose_near_match
from worker.config import BatchingSettings, CacheSettings, DecodeSettings
from worker.decode import DecodeLimits
from worker.decode.prepare import Prepared, Recipe, decode_prepared
from worker.errors import CacheUnavailable
from worker.hashing import HASH_VERSION, ImageHashes, hash_reduced
from worker.hashing.pdq import PdqHash, pdq_hash
from worker.log import get_logger
from worker.messages import CacheOutcome, HashInfo, Verdict
from worker.models.backend import Backend, ModelOutput, Scores, scores_from_probabilities
from worker.models.preprocess import draft_size
from worker.policy import Policy
from worker.timing import Clock

__all__ = ["Found", "PerceptualOptions", "PipelineOptions", "ScoreLookup"]

log = get_logger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    exact_decode: bool = False
    embed: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    #: decode and prepare: in this thread by default, or in a decode pool's processes
    #: (``worker.decode.pool``: ``DecodePool.prepare``)
    decoder: Callable[[bytes, DecodeLimits, int | None, Recipe], Prepared] = decode_prepared

    @classmethod
    def from_settings(
        cls, decode: DecodeSettings, batching: BatchingSettings, embed: bool = False
    ) -> PipelineOptions:
        return cls(
            limits=decode.limits,
            exact_decode=decode.exact,
            embed=embed,
            max_batch_size=batching.max_batch_size,
            max_wait_ms=batching.max_wait_ms,
        )


@dataclass(frozen=True)
class PerceptualOptions:
    """The perceptual cache tier: ``radius`` in bits of a 64-bit pHash. A near-duplicate
    inherits a block verdict only (``choose_near_match``)."""

    enabled: bool = True
    radius: int = 6

    @classmethod
    def from_settings(cls, cache: CacheSettings) -> PerceptualOptions:
        if cache.perceptual_reuse_safe:
            # Accepted so existing deployments start, but a safe verdict is the most lowering
            # one a near match could lend, and no pair of hashes makes that safe.
            log.warning(
                "MODQ_PERCEPTUAL_REUSE_SAFE is deprecated and ignored: a perceptual match "
                "reuses only a block verdict; every other image is classified"
            )
        return cls(radius=cache.perceptual_radius)


@dataclass(frozen=True)
class _Job:
    array: np.ndarray
    embed: bool


@dataclass(frozen=True)
class _Inferred:
    output: ModelOutput
    forward_seconds: float


@dataclass(frozen=True)
class Found:
    """Scores for one image and where they came from (the model, or a cache tier), or the
    hash bank that blocks it before any of them."""

    scores: Scores | None
    outcome: CacheOutcome
    hashes: HashInfo
    frames: int
    distance: int | None = None
    embedding: np.ndarray | None = None
    infer_ms: float = 0.0
    bank: BankMatch | None = None


class ScoreLookup:
    def __init__(
        self,
        backend: Backend,
        cache: VerdictCache | None,
        options: PipelineOptions,
        perceptual: PerceptualOptions,
        banks: BankGate | None = None,
        embed_always: bool = False,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.options = options
        self.perceptual = perceptual
        self.banks = banks
        self.embed_always = embed_always
        card = backend.card
        draft = "exact" if options.exact_decode else f"draft{draft_size(card)}"
        # Scores are reused only for the same model, preprocessing, decode and hash method.
        self.namespace = f"{card.cache_namespace}/{draft}/h{HASH_VERSION}"
        self._draft_size = None if options.exact_decode else draft_size(card)
        # The decoder hands back the model's inputs and the reduction the hashes read; the
        # frames only where a model's fitting is not Pillow's, or for the banks' PDQ.
        fit = backend.fit
        self._recipe = Recipe(fit, frames=fit is None, reduced=True)
        self._bank_recipe = Recipe(fit, frames=True, reduced=True)
        self.batcher: DynamicBatcher[_Job, _Inferred] = DynamicBatcher(
            self._infer, options.max_batch_size, options.max_wait_ms
        )

    def close(self) -> None:
        self.batcher.close()

    def _infer(self, jobs: list[_Job]) -> list[_Inferred]:
        started = time.perf_counter()
        # The embedding is the pre-logits row of the same pass: asking for it costs little.
        embed = any(job.embed for job in jobs)
        output = self.backend.forward(np.stack([job.array for job in jobs]), embed=embed)
        seconds = time.perf_counter() - started
        return [_Inferred(self.backend.postprocess(output, i), seconds) for i in range(len(jobs))]

    def _bank_match(
        self, data: bytes, entry: CachedEntry | None
    ) -> tuple[BankMatch | None, PdqHash | None, Prepared | None]:
        """The bank match of these bytes, their PDQ, and the decode made to hash them (the
        PDQ an exact cache entry kept spares that decode)."""
        if self.banks is None or not self.banks.active():
            return None, None, None
        decoded = None
        if entry is not None and entry.pdq is not None:
            pdq = PdqHash(entry.pdq, entry.pdq_quality or 0)
        else:
            decoded = self._decode(data, self._bank_recipe)
            pdq = pdq_hash(decoded.frames[0])
        return self.banks.check(pdq), pdq, decoded

    def find(self, data: bytes, sha256: str, clock: Clock, policy: Policy, embed: bool) -> Found:
        """Hash banks, then the exact cache tier, then decode and hash, then the perceptual
        tier, then the model. A request for the embedding always runs the model (the cache
        keeps no embeddings); with ``embed_always`` (a sink is on), every model run computes one."""
        entry = None if embed else self._cache_get(sha256)
        bank, pdq, decoded = self._bank_match(data, entry)
        pdq_info = {} if pdq is None else {"pdq": pdq.hex, "pdq_quality": pdq.quality}
        if bank is not None:
            clock.mark("decode")
            frames = len(decoded.sizes) if decoded else entry.frames if entry else 1
            return Found(
                None, CacheOutcome.MISS, HashInfo(sha256=sha256, **pdq_info), frames, bank=bank
            )
        if entry is not None:
            hashes = HashInfo(sha256=sha256, phash=entry.phash, dhash=entry.dhash, **pdq_info)
            return Found(
                self._scores(entry.probabilities), CacheOutcome.EXACT, hashes, entry.frames
            )
        decoded = decoded or self._decode(data, self._recipe)
        assert decoded.reduced is not None
        image_hashes = hash_reduced(decoded.reduced, decoded.sizes[0], sha256)
        hashes = HashInfo(
            sha256=sha256, phash=image_hashes.phash, dhash=image_hashes.dhash, **pdq_info
        )
        near = None if embed else self._near(image_hashes, policy)
        if near is not None:
            clock.mark("decode")
            scores = self._scores(near.entry.probabilities)
            return Found(
                scores, CacheOutcome.PERCEPTUAL, hashes, near.entry.frames, near.phash_distance
            )
        arrays = self._arrays(decoded)
        clock.mark("decode")
        want = embed or self.embed_always
        futures = [self.batcher.submit(_Job(array, want)) for array in arrays]
        inferred = [future.result() for future in futures]
        clock.mark("wait")
        # Animated images: the worst sampled frame decides.
        worst = max(inferred, key=lambda item: item.output.scores.nsfw_score)
        scores = worst.output.scores
        self._cache_put(
            sha256,
            CachedEntry(
                scores.probabilities,
                len(arrays),
                image_hashes.phash,
                image_hashes.dhash,
                image_hashes.informative,
                None if pdq is None else pdq.hex,
                None if pdq is None else pdq.quality,
            ),
        )
        return Found(
            scores,
            CacheOutcome.MISS if self.cache is not None else CacheOutcome.DISABLED,
            hashes,
            len(arrays),
            embedding=worst.output.embedding,
            infer_ms=max(item.forward_seconds for item in inferred) * 1000,
        )

    def _decode(self, data: bytes, recipe: Recipe) -> Prepared:
        return self.options.decoder(data, self.options.limits, self._draft_size, recipe)

    def _arrays(self, decoded: Prepared) -> list[np.ndarray]:
        """The model's input arrays, one per sampled frame."""
        if decoded.inputs:
            return [self.backend.normalize(fitted) for fitted in decoded.inputs]
        return [self.backend.preprocess(frame) for frame in decoded.frames]

    def _near(self, hashes: ImageHashes, policy: Policy) -> NearMatch | None:
        """The perceptual tier. A near-duplicate inherits a cached score only when it blocks
        under this request's policy: no model run on the image itself could answer worse, so
        reuse never lowers a verdict. Flat or tiny images look alike to any perceptual hash
        and are never matched."""
        if self.cache is None or not hashes.informative or not self.perceptual.enabled:
            return None
        radius = self.perceptual.radius
        try:
            matches = self.cache.near(self.namespace, hashes.phash, hashes.dhash, radius)
        except CacheUnavailable as exc:
            log.warning("cache unavailable; classifying", error=str(exc))
            return None

        def blocks(entry: CachedEntry) -> bool:
            scores = self._scores(entry.probabilities)
            return policy.decide(scores.nsfw_score) is Verdict.BLOCK

        return choose_near_match(matches, blocks, radius)

    def _scores(self, probabilities: dict[str, float]) -> Scores:
        row = np.array(
            [probabilities[label] for label in self.backend.card.labels], dtype=np.float64
        )
        return scores_from_probabilities(self.backend.card, row)

    def _cache_get(self, sha256: str) -> CachedEntry | None:
        if self.cache is None:
            return None
        try:
            return self.cache.get(self.namespace, sha256)
        except CacheUnavailable as exc:
            log.warning("cache unavailable; classifying", error=str(exc))
            return None

    def _cache_put(self, sha256: str, entry: CachedEntry) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(self.namespace, sha256, entry)
        except CacheUnavailable as exc:
            log.warning("cache unavailable; result not cached", error=str(exc))
