"""The moderation pipeline for one image, shared by `modq scan` and the queue worker.

    ref ─read─▶ bytes ─sha256─▶ banks? ──match───────────────────────────▶ block
                                  │ no
                                  ▼
                                cache? ──hit──────────────────────────────┐
                                  │ miss                                   ▼
                                  └─decode─▶ frames ─hash, preprocess─▶ batcher ─▶ scores
                                                                           │
                         result ◀── quarantine (block) ◀── policy ◀────────┘
                           │
                           └─ embedding to the sink · heatmap for a review verdict

Where scores come from is ``worker.lookup``; this module turns them into a result and takes
the verdict's action. Each call runs in its caller's thread; only the forward pass is shared,
through the dynamic batcher. A failure becomes an error result with its stable code and never
touches another image. Knows nothing of Celery.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Literal

from worker import metrics
from worker.cache import VerdictCache
from worker.errors import ModqError
from worker.extras import Extras
from worker.hashing import sha256_hex
from worker.log import get_logger
from worker.lookup import Found, PerceptualOptions, PipelineOptions, ScoreLookup
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
        self.lookup = ScoreLookup(
            backend, cache, self.options, self.perceptual, self.banks, self.tap is not None
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
        self.extras.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        found = self.lookup.find(data, sha256, clock, policy, embed)
        if found.bank is not None or found.scores is None:
            return self._banked(ref, request_id, clock, found, act)
        metrics.CACHE_OUTCOMES.labels(found.outcome.value).inc()
        scores = found.scores
        verdict = policy.decide(scores.nsfw_score)
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
        self, ref: str, request_id: str, clock: Clock, found: Found, act: bool
    ) -> ModerationResult:
        """A bank match blocks whatever a model would say; the model does not run."""
        assert found.bank is not None
        metrics.BANK_MATCHES.labels(found.bank.bank).inc()
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
        return ModerationResult(
            request_id=request_id,
            image=ref,
            status=Status.ERROR,
            model=self._model,
            timings=clock.timings(),
            error=ErrorInfo(code=code, message=message, retryable=retryable),
        )
