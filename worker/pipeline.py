"""The moderation pipeline for one image, shared by `modq scan` and the queue worker.

    ref ─read─▶ bytes ─sha256─▶ cache? ──hit──────────────────────────────┐
                                  │ miss                                   ▼
                                  └─decode─▶ frames ─hash, preprocess─▶ batcher ─▶ scores
                                                                           │
                         result ◀── quarantine (block) ◀── policy ◀────────┘

Each call runs in its caller's thread; only the forward pass is shared, through the dynamic
batcher. A failure becomes an error result with its stable code and never touches another
image. Knows nothing of Celery.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from worker import metrics
from worker.banks.base import BankMatch
from worker.banks.pdq import PdqHash, pdq_hash
from worker.batching import DynamicBatcher
from worker.cache import CachedEntry, NearMatch, VerdictCache, choose_near_match
from worker.config import Settings
from worker.decode import DecodedImage, DecodeLimits, decode
from worker.errors import CacheUnavailable, ModqError
from worker.extras import Extras
from worker.hashing import ImageHashes, hash_image, sha256_hex
from worker.log import get_logger
from worker.messages import (
    ActionInfo,
    BankMatchInfo,
    CacheInfo,
    CacheOutcome,
    ErrorInfo,
    HashInfo,
    ModelInfo,
    ModerationResult,
    Status,
    Verdict,
)
from worker.models.backend import Backend, ModelOutput, Scores, scores_from_probabilities
from worker.models.preprocess import draft_size
from worker.policy import Policy
from worker.quarantine import Quarantine
from worker.storage import ObjectStore
from worker.timing import Clock

__all__ = ["PerceptualOptions", "Pipeline", "PipelineOptions"]

log = get_logger(__name__)

_ACTION_KINDS: dict[str, Literal["quarantine_move", "quarantine_copy", "tag"]] = {
    "move": "quarantine_move",
    "copy": "quarantine_copy",
    "tag": "tag",
}


@dataclass(frozen=True)
class PipelineOptions:
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    exact_decode: bool = False
    embed: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings, embed: bool = False) -> PipelineOptions:
        return cls(
            limits=DecodeLimits(
                settings.max_image_bytes,
                settings.max_image_pixels,
                settings.max_frames,
                settings.sample_frames,
            ),
            exact_decode=settings.exact_decode,
            embed=embed,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
        )


@dataclass(frozen=True)
class PerceptualOptions:
    """The perceptual cache tier: ``radius`` in bits of a 64-bit pHash; ``reuse_safe`` lets a
    near-duplicate inherit a safe verdict too (then pHash and dHash must both agree)."""

    enabled: bool = True
    radius: int = 6
    reuse_safe: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> PerceptualOptions:
        return cls(radius=settings.perceptual_radius, reuse_safe=settings.perceptual_reuse_safe)


@dataclass(frozen=True)
class _Job:
    array: np.ndarray
    embed: bool


@dataclass(frozen=True)
class _Inferred:
    output: ModelOutput
    forward_seconds: float


@dataclass(frozen=True)
class _Lookup:
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


class Pipeline:
    def __init__(
        self,
        backend: Backend,
        store: ObjectStore,
        policy: Policy,
        cache: VerdictCache | None = None,
        quarantine: Quarantine | None = None,
        options: PipelineOptions | None = None,
        perceptual: PerceptualOptions | None = None,
        extras: Extras | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.policy = policy
        self.cache = cache
        self.quarantine = quarantine
        self.options = options or PipelineOptions()
        self.perceptual = perceptual or PerceptualOptions()
        self.extras = extras or Extras()
        # With a tap, every image the model scores has its embedding streamed to a sink.
        self.tap = self.extras.tap
        # Known-bad hash banks, matched by PDQ before any cache tier or the model.
        self.banks = self.extras.banks
        # A heatmap for each review verdict, written beside the result.
        self.heatmaps = self.extras.heatmaps
        card = backend.card
        draft = "exact" if self.options.exact_decode else f"draft{draft_size(card)}"
        self.namespace = f"{card.cache_namespace}/{draft}"
        self._draft_size = None if self.options.exact_decode else draft_size(card)
        self._model = ModelInfo(
            id=card.id, revision=card.revision, runtime=card.runtime, precision=backend.precision
        )
        self.batcher: DynamicBatcher[_Job, _Inferred] = DynamicBatcher(
            self._infer, self.options.max_batch_size, self.options.max_wait_ms
        )

    def close(self) -> None:
        self.batcher.close()
        self.extras.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _infer(self, jobs: list[_Job]) -> list[_Inferred]:
        started = time.perf_counter()
        # The embedding is the pre-logits row of the same pass: asking for it costs little.
        embed = any(job.embed for job in jobs)
        output = self.backend.forward(np.stack([job.array for job in jobs]), embed=embed)
        seconds = time.perf_counter() - started
        return [_Inferred(self.backend.postprocess(output, i), seconds) for i in range(len(jobs))]

    def process(
        self,
        ref: str,
        request_id: str | None = None,
        *,
        policy: Policy | None = None,
        embed: bool | None = None,
        act: bool = True,
    ) -> ModerationResult:
        """Moderate one image. ``policy`` and ``embed`` override the pipeline's own for this
        request; with ``act=False`` the verdict's quarantine action is left to a later
        ``apply_action`` (queue mode records the result first). Failures come back as error
        results carrying their stable code."""
        request_id = request_id or uuid.uuid4().hex
        clock = Clock()
        metrics.IN_FLIGHT.inc()
        try:
            return self._process(
                ref,
                request_id,
                clock,
                policy or self.policy,
                self.options.embed if embed is None else embed,
                act,
            )
        except ModqError as exc:
            return self._error(ref, request_id, clock, exc.code, str(exc), exc.retryable)
        except Exception as exc:  # a bug must not stop a scan: report it on the image
            log.exception("unexpected error", ref=ref, request_id=request_id)
            return self._error(ref, request_id, clock, "internal", repr(exc), False)
        finally:
            metrics.IN_FLIGHT.dec()

    def process_many(self, refs: Iterable[str], concurrency: int) -> Iterator[ModerationResult]:
        """Run ``refs`` on ``concurrency`` threads, yielding results as they finish, with at
        most ``2 * concurrency`` images held in memory."""
        with ThreadPoolExecutor(concurrency, thread_name_prefix="modq") as pool:
            pending: set[Future[ModerationResult]] = set()
            for ref in refs:
                if len(pending) >= 2 * concurrency:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
                pending.add(pool.submit(self.process, ref))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)

    def _process(
        self, ref: str, request_id: str, clock: Clock, policy: Policy, embed: bool, act: bool
    ) -> ModerationResult:
        data = self.store.read(ref, self.options.limits.max_bytes)
        sha256 = sha256_hex(data)
        clock.mark("fetch")
        found = self._lookup(data, sha256, clock, policy, embed)
        if found.bank is not None or found.scores is None:
            return self._banked(ref, request_id, clock, found, act)
        metrics.CACHE_OUTCOMES.labels(found.outcome.value).inc()
        scores = found.scores
        verdict = policy.decide(scores.nsfw_score)
        metrics.VERDICTS.labels(verdict.value).inc()
        result = ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.OK,
            verdict=verdict,
            nsfw_score=scores.nsfw_score,
            scores=scores.probabilities,
            level=scores.level,
            level_scores=scores.level_scores,
            frames=found.frames,
            model=self._model,
            cache=CacheInfo(outcome=found.outcome, distance=found.distance),
            hashes=found.hashes,
            action=ActionInfo(kind="none"),
            timings=clock.timings(found.infer_ms),
            embedding=None if found.embedding is None or not embed else found.embedding.tolist(),
        )
        if verdict is Verdict.REVIEW and self.heatmaps is not None:
            explanation = self.heatmaps.attach(data, sha256, request_id)
            result = result.model_copy(update={"explanation": explanation})
        if self.tap is not None and found.embedding is not None:
            self.tap.scored(result, found.embedding, self.action_pending(result))
        if not act:
            return result
        acted = self._with_action(result)
        if self.tap is not None and found.embedding is not None:
            self.tap.acted(acted)
        return acted

    def _banked(
        self, ref: str, request_id: str, clock: Clock, found: _Lookup, act: bool
    ) -> ModerationResult:
        """A bank match blocks whatever a model would say; the model does not run."""
        assert found.bank is not None
        metrics.BANK_MATCHES.labels(found.bank.bank).inc()
        metrics.VERDICTS.labels(Verdict.BLOCK.value).inc()
        bank = found.bank
        result = ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.OK,
            verdict=Verdict.BLOCK,
            frames=found.frames,
            model=self._model,
            hashes=found.hashes,
            action=ActionInfo(kind="none"),
            timings=clock.timings(),
            bank=BankMatchInfo(bank=bank.bank, distance=bank.distance, hash=bank.hash),
        )
        return self._with_action(result) if act else result

    def _bank_match(
        self, data: bytes, entry: CachedEntry | None
    ) -> tuple[BankMatch | None, PdqHash | None, DecodedImage | None]:
        """The bank match of these bytes, their PDQ, and the decode made to hash them (the
        PDQ an exact cache entry kept spares that decode)."""
        if self.banks is None or not self.banks.active():
            return None, None, None
        decoded = None
        if entry is not None and entry.pdq is not None:
            pdq = PdqHash(entry.pdq, entry.pdq_quality or 0)
        else:
            decoded = decode(data, self.options.limits, self._draft_size)
            pdq = pdq_hash(decoded.frames[0])
        return self.banks.check(pdq), pdq, decoded

    def _lookup(
        self, data: bytes, sha256: str, clock: Clock, policy: Policy, embed: bool
    ) -> _Lookup:
        """Hash banks, then the exact cache tier, then decode and hash, then the perceptual
        tier, then the model. A request for the embedding always runs the model (the cache
        keeps no embeddings); with a tap, every model run computes one."""
        entry = None if embed else self._cache_get(sha256)
        bank, pdq, decoded = self._bank_match(data, entry)
        pdq_info = {} if pdq is None else {"pdq": pdq.hex, "pdq_quality": pdq.quality}
        if bank is not None:
            clock.mark("decode")
            frames = len(decoded.frames) if decoded else entry.frames if entry else 1
            return _Lookup(
                None, CacheOutcome.MISS, HashInfo(sha256=sha256, **pdq_info), frames, bank=bank
            )
        if entry is not None:
            hashes = HashInfo(sha256=sha256, phash=entry.phash, dhash=entry.dhash, **pdq_info)
            return _Lookup(
                self._scores(entry.probabilities), CacheOutcome.EXACT, hashes, entry.frames
            )
        decoded = decoded or decode(data, self.options.limits, self._draft_size)
        image_hashes = hash_image(data, decoded.frames[0], sha256)
        hashes = HashInfo(
            sha256=sha256, phash=image_hashes.phash, dhash=image_hashes.dhash, **pdq_info
        )
        near = None if embed else self._near(image_hashes, policy)
        if near is not None:
            clock.mark("decode")
            scores = self._scores(near.entry.probabilities)
            return _Lookup(
                scores, CacheOutcome.PERCEPTUAL, hashes, near.entry.frames, near.phash_distance
            )
        arrays = [self.backend.preprocess(frame) for frame in decoded.frames]
        clock.mark("decode")
        want = embed or self.tap is not None
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
        return _Lookup(
            scores,
            CacheOutcome.MISS if self.cache is not None else CacheOutcome.DISABLED,
            hashes,
            len(arrays),
            embedding=worst.output.embedding,
            infer_ms=max(item.forward_seconds for item in inferred) * 1000,
        )

    def _near(self, hashes: ImageHashes, policy: Policy) -> NearMatch | None:
        """The perceptual tier. Trust is asymmetric: a near-duplicate may inherit an unsafe
        verdict; a safe one only when the operator opted in and both hashes agree. Flat or
        tiny images look alike to any perceptual hash and are never matched."""
        if self.cache is None or not hashes.informative or not self.perceptual.enabled:
            return None
        radius = self.perceptual.radius
        try:
            matches = self.cache.near(self.namespace, hashes.phash, hashes.dhash, radius)
        except CacheUnavailable as exc:
            log.warning("cache unavailable; classifying", error=str(exc))
            return None

        def is_unsafe(entry: CachedEntry) -> bool:
            scores = self._scores(entry.probabilities)
            return policy.decide(scores.nsfw_score) is not Verdict.ALLOW

        return choose_near_match(matches, is_unsafe, self.perceptual.reuse_safe, radius)

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

    def action_pending(self, result: ModerationResult) -> bool:
        """Whether ``result``'s verdict calls for a quarantine action not yet taken."""
        quarantine = self.quarantine
        return (
            result.verdict is Verdict.BLOCK
            and result.hashes is not None
            and (result.action is None or result.action.kind == "none")
            and quarantine is not None
            and quarantine.handles(result.image)
        )

    def moves_source(self, result: ModerationResult) -> bool:
        """Whether ``apply_action`` would take the image away from its source."""
        return self.action_pending(result) and getattr(self.quarantine, "action", "") == "move"

    def apply_action(self, result: ModerationResult) -> ModerationResult:
        """Carry out the quarantine action ``result``'s verdict calls for. Idempotent: run
        again after a crash, it finishes what the first run began and returns the same
        result. Failures come back as error results."""
        try:
            acted = self._with_action(result)
        except ModqError as exc:
            failed = self._error(
                result.image, result.request_id, Clock(), exc.code, str(exc), exc.retryable
            )
            acted = failed.model_copy(update={"metadata": result.metadata})
            if not exc.retryable and self.tap is not None:
                self.tap.acted(result)
            return acted
        if self.tap is not None:
            self.tap.acted(acted)
        return acted

    def _with_action(self, result: ModerationResult) -> ModerationResult:
        # Read-only sources (http(s)://) are never acted on: the caller owns the image.
        quarantine = self.quarantine
        if not self.action_pending(result) or quarantine is None or result.hashes is None:
            return result
        record = {
            "request_id": result.request_id,
            "verdict": Verdict.BLOCK.value,  # action_pending: only blocks are acted on
            "nsfw_score": result.nsfw_score,
            "scores": result.scores,
            "model": self._model.model_dump(),
        }
        location = quarantine.apply(result.image, result.hashes.sha256, record)
        action = ActionInfo(kind=_ACTION_KINDS[quarantine.action], location=location)
        return result.model_copy(update={"action": action})

    def _error(
        self, ref: str, request_id: str, clock: Clock, code: str, message: str, retryable: bool
    ) -> ModerationResult:
        metrics.ERRORS.labels(code).inc()
        return ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.ERROR,
            model=self._model,
            timings=clock.timings(),
            error=ErrorInfo(code=code, message=message, retryable=retryable),
        )
