"""The moderation pipeline for one image, shared by every front end: assess, then act.

    ref ─read─▶ bytes ─sha256─▶ banks? ──match───────────────────────────▶ block
                                  │ no
                                  ▼
                                cache? ──hit──────────────────────────────┐
                                  │ miss                                   ▼
                                  └─decode─▶ frames ─hash, preprocess─▶ batcher ─▶ scores
                                                                           │
                                                     Assessed ◀── policy ◀─┘
                                                        │
                         result ◀── actions (heatmap, quarantine, embedding record)

``assess`` has no side effects and raises typed errors (``worker.errors``); where scores come
from is ``worker.scores``. The actions (``worker.actions``) run on the assessed result. The
queue service stores the assessment between the two; ``process`` runs both in one call for
``modq scan`` and turns a failure into an error result with its stable code. Each call runs
in its caller's thread; only the forward pass is shared, through the dynamic batcher. Knows
nothing of Celery.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from worker import metrics
from worker.actions import Actions, Assessed
from worker.banks.gate import BankGate
from worker.cache import VerdictCache
from worker.errors import ModqError
from worker.hashing import sha256_hex
from worker.log import get_logger
from worker.messages import (
    ActionInfo,
    BankMatchInfo,
    CacheInfo,
    ErrorInfo,
    ModelInfo,
    ModerationResult,
    Status,
    Verdict,
)
from worker.models.backend import Backend
from worker.policy import Policy
from worker.scores import Found, PerceptualOptions, PipelineOptions, ScoreLookup
from worker.storage import ObjectStore
from worker.timing import Clock

__all__ = ["Assessed", "PerceptualOptions", "Pipeline", "PipelineOptions"]

log = get_logger(__name__)


class Pipeline:
    def __init__(
        self,
        backend: Backend,
        store: ObjectStore,
        policy: Policy,
        *,
        cache: VerdictCache | None = None,
        banks: BankGate | None = None,
        actions: Actions | None = None,
        options: PipelineOptions | None = None,
        perceptual: PerceptualOptions | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.policy = policy
        self.cache = cache
        #: known-bad hash banks, matched by PDQ before any cache tier or the model
        self.banks = banks
        self.actions = actions or Actions()
        self.options = options or PipelineOptions()
        self.perceptual = perceptual or PerceptualOptions()
        self.lookup = ScoreLookup(
            backend,
            cache,
            self.options,
            self.perceptual,
            banks,
            self.actions.wants_embeddings,
        )
        self.namespace = self.lookup.namespace
        self.batcher = self.lookup.batcher
        card = backend.card
        self._model = ModelInfo(
            id=card.id, revision=card.revision, runtime=card.runtime, precision=backend.precision
        )

    @property
    def model(self) -> ModelInfo:
        """The model every result names: id, revision, runtime, precision."""
        return self._model

    def close(self) -> None:
        self.lookup.close()
        self.actions.close()
        if self.banks is not None:
            self.banks.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def assess(
        self,
        ref: str,
        request_id: str,
        *,
        policy: Policy | None = None,
        embed: bool | None = None,
    ) -> Assessed:
        """The verdict on one image, with no side effect. ``policy`` and ``embed`` override
        the pipeline's own for this request. Failures raise their typed error."""
        clock = Clock()
        policy = policy or self.policy
        embed = self.options.embed if embed is None else embed
        metrics.IN_FLIGHT.inc()
        try:
            data = self.store.read(ref, self.options.limits.max_bytes)
            sha256 = sha256_hex(data)
            clock.mark("fetch")
            found = self.lookup.find(data, sha256, clock, policy, embed)
        finally:
            metrics.IN_FLIGHT.dec()
        if found.bank is not None or found.scores is None:
            return Assessed(self._banked(ref, request_id, clock, found))
        metrics.CACHE_OUTCOMES.labels(found.outcome.value).inc()
        scores = found.scores
        result = ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.OK,
            verdict=policy.decide(scores.nsfw_score),
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
        return Assessed(result, data, found.embedding)

    def process(
        self,
        ref: str,
        request_id: str | None = None,
        *,
        policy: Policy | None = None,
        embed: bool | None = None,
    ) -> ModerationResult:
        """Assess one image and take its actions, in one call (``modq scan``). Failures come
        back as error results carrying their stable code."""
        request_id = request_id or uuid.uuid4().hex
        clock = Clock()
        try:
            return self.actions.act(self.assess(ref, request_id, policy=policy, embed=embed))
        except ModqError as exc:
            return self.error_result(ref, request_id, exc, clock)
        except Exception as exc:  # a bug must not stop a scan: report it on the image
            log.exception("unexpected error", ref=ref, request_id=request_id)
            return self.error_result(ref, request_id, exc, clock)

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

    def _banked(self, ref: str, request_id: str, clock: Clock, found: Found) -> ModerationResult:
        """A bank match blocks whatever a model would say; the model does not run."""
        assert found.bank is not None
        metrics.BANK_MATCHES.labels(found.bank.bank).inc()
        bank = found.bank
        return ModerationResult(
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

    def error_result(
        self, ref: str, request_id: str, exc: Exception, clock: Clock | None = None
    ) -> ModerationResult:
        """The result of an image that failed: a typed error's stable code, else
        ``internal``."""
        if isinstance(exc, ModqError):
            error = ErrorInfo(code=exc.code, message=str(exc), retryable=exc.retryable)
        else:
            error = ErrorInfo(code="internal", message=repr(exc), retryable=False)
        return ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.ERROR,
            model=self._model,
            timings=(clock or Clock()).timings(),
            error=error,
        )
