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

import numpy as np

from worker import metrics
from worker.batching import DynamicBatcher
from worker.cache import CachedEntry, VerdictCache
from worker.decode import DecodeLimits, decode
from worker.errors import CacheUnavailable, ModqError
from worker.hashing import ImageHashes, hash_image, sha256_hex
from worker.log import get_logger
from worker.messages import (
    ActionInfo,
    CacheInfo,
    CacheOutcome,
    ErrorInfo,
    HashInfo,
    ModelInfo,
    ModerationResult,
    Status,
    Timings,
    Verdict,
)
from worker.models.backend import Backend, ModelOutput, Scores, scores_from_probabilities
from worker.models.preprocess import draft_size
from worker.policy import Policy
from worker.quarantine import Quarantine
from worker.storage import ObjectStore

__all__ = ["Pipeline", "PipelineOptions"]

log = get_logger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    exact_decode: bool = False
    embed: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 10.0


@dataclass(frozen=True)
class _Inferred:
    output: ModelOutput
    forward_seconds: float


@dataclass
class _Clock:
    started: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = self.started

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = self.marks.get(name, 0.0) + (now - self.last) * 1000
        self.last = now

    def timings(self, infer_ms: float = 0.0) -> Timings:
        wait_ms = self.marks.get("wait", 0.0)
        return Timings(
            fetch_ms=round(self.marks.get("fetch", 0.0), 3),
            decode_ms=round(self.marks.get("decode", 0.0), 3),
            queue_ms=round(max(0.0, wait_ms - infer_ms), 3),
            infer_ms=round(infer_ms, 3),
            total_ms=round((time.perf_counter() - self.started) * 1000, 3),
        )


class Pipeline:
    def __init__(
        self,
        backend: Backend,
        store: ObjectStore,
        policy: Policy,
        cache: VerdictCache | None = None,
        quarantine: Quarantine | None = None,
        options: PipelineOptions | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.policy = policy
        self.cache = cache
        self.quarantine = quarantine
        self.options = options or PipelineOptions()
        card = backend.card
        draft = "exact" if self.options.exact_decode else f"draft{draft_size(card)}"
        self.namespace = f"{card.cache_namespace}/{draft}"
        self._draft_size = None if self.options.exact_decode else draft_size(card)
        self._model = ModelInfo(
            id=card.id, revision=card.revision, runtime=card.runtime, precision=backend.precision
        )
        self.batcher: DynamicBatcher[np.ndarray, _Inferred] = DynamicBatcher(
            self._infer, self.options.max_batch_size, self.options.max_wait_ms
        )

    def close(self) -> None:
        self.batcher.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _infer(self, arrays: list[np.ndarray]) -> list[_Inferred]:
        started = time.perf_counter()
        output = self.backend.forward(np.stack(arrays), embed=self.options.embed)
        seconds = time.perf_counter() - started
        return [_Inferred(self.backend.postprocess(output, i), seconds) for i in range(len(arrays))]

    def process(self, ref: str, request_id: str | None = None) -> ModerationResult:
        request_id = request_id or uuid.uuid4().hex
        clock = _Clock()
        metrics.IN_FLIGHT.inc()
        try:
            return self._process(ref, request_id, clock)
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

    def _process(self, ref: str, request_id: str, clock: _Clock) -> ModerationResult:
        data = self.store.read(ref, self.options.limits.max_bytes)
        sha256 = sha256_hex(data)
        clock.mark("fetch")
        entry = None if self.options.embed else self._cache_get(sha256)
        embedding: np.ndarray | None = None
        infer_ms = 0.0
        if entry is not None:
            outcome = CacheOutcome.EXACT
            scores = self._scores(entry.probabilities)
            hashes = HashInfo(sha256=sha256, phash=entry.phash, dhash=entry.dhash)
            frames = entry.frames
        else:
            outcome = CacheOutcome.MISS if self.cache is not None else CacheOutcome.DISABLED
            scores, embedding, infer_ms, image_hashes, frames = self._classify(data, sha256, clock)
            hashes = HashInfo(sha256=sha256, phash=image_hashes.phash, dhash=image_hashes.dhash)
            self._cache_put(
                sha256,
                CachedEntry(scores.probabilities, frames, image_hashes.phash, image_hashes.dhash),
            )
        metrics.CACHE_OUTCOMES.labels(outcome.value).inc()
        verdict = self.policy.decide(scores.nsfw_score)
        action = self._act(ref, request_id, sha256, verdict, scores)
        metrics.VERDICTS.labels(verdict.value).inc()
        return ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.OK,
            verdict=verdict,
            nsfw_score=scores.nsfw_score,
            scores=scores.probabilities,
            level=scores.level,
            level_scores=scores.level_scores,
            frames=frames,
            model=self._model,
            cache=CacheInfo(outcome=outcome),
            hashes=hashes,
            action=action,
            timings=clock.timings(infer_ms),
            embedding=None if embedding is None else [float(v) for v in embedding],
        )

    def _classify(
        self, data: bytes, sha256: str, clock: _Clock
    ) -> tuple[Scores, np.ndarray | None, float, ImageHashes, int]:
        decoded = decode(data, self.options.limits, self._draft_size)
        image_hashes = hash_image(data, decoded.frames[0], sha256)
        arrays = [self.backend.preprocess(frame) for frame in decoded.frames]
        clock.mark("decode")
        futures = [self.batcher.submit(array) for array in arrays]
        inferred = [future.result() for future in futures]
        clock.mark("wait")
        # Animated images: the worst sampled frame decides.
        worst = max(inferred, key=lambda item: item.output.scores.nsfw_score)
        infer_ms = max(item.forward_seconds for item in inferred) * 1000
        return worst.output.scores, worst.output.embedding, infer_ms, image_hashes, len(arrays)

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

    def _act(
        self, ref: str, request_id: str, sha256: str, verdict: Verdict, scores: Scores
    ) -> ActionInfo:
        if verdict is not Verdict.BLOCK or self.quarantine is None:
            return ActionInfo(kind="none")
        record = {
            "request_id": request_id,
            "verdict": verdict.value,
            "nsfw_score": scores.nsfw_score,
            "scores": scores.probabilities,
            "model": self._model.model_dump(),
        }
        return ActionInfo(
            kind="quarantine_move", location=self.quarantine.move(ref, sha256, record)
        )

    def _error(
        self, ref: str, request_id: str, clock: _Clock, code: str, message: str, retryable: bool
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
