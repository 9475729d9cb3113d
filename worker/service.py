"""One moderation request, start to finish, with the delivery rules of queue mode.

    request ─▶ stored result? ──yes─────────────────────┐ (a re-delivery)
                  │ no                                   ▼
                  └─▶ pipeline ─▶ retry? ─▶ store once ─▶ quarantine ─▶ publish ─▶ done
                                                                          │ error result or
                                                                          ▼ undeliverable
                                                                     dead letter

The verdict is stored (first writer wins) before the source is touched and before anything
is published, so a re-delivered request publishes the same result and repeats no work: the
quarantine action runs again, and being idempotent it only finishes what a crash cut short
(a source already moved is found in quarantine, not reported missing). Knows nothing of
Celery: the task maps ``RetryableError`` to a retry and returns (acks) only after
``handle`` has published.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from worker import metrics
from worker.cache.results import ResultStore
from worker.callbacks import Publisher
from worker.errors import (
    CacheUnavailable,
    InvalidCallback,
    InvalidRequest,
    PermanentError,
    RetryableError,
)
from worker.log import get_logger
from worker.messages import ErrorInfo, ModerationRequest, ModerationResult, Status
from worker.pipeline import Pipeline
from worker.policy import Policy

__all__ = ["Handled", "ModerationService", "TransientFailure"]

log = get_logger(__name__)


class TransientFailure(RetryableError):
    """A retryable failure the pipeline reported on its result; ``error`` says which."""

    code = "transient"

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


@dataclass(frozen=True)
class Handled:
    result: ModerationResult
    #: the request and result belong in the dead-letter queue (why, as a stable code)
    dead_letter: str | None = None
    #: a re-delivery: the stored result was published again, nothing was re-run
    republished: bool = False


class ModerationService:
    def __init__(
        self,
        pipeline: Pipeline,
        publisher: Publisher,
        results: ResultStore | None,
        policies: dict[str, Policy],
        default_callback: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.publisher = publisher
        self.results = results
        self.policies = policies
        self.default_callback = default_callback

    def handle(self, request: ModerationRequest, *, may_retry: bool) -> Handled:
        """Moderate ``request`` and publish its one result. Raises ``RetryableError`` when a
        retry may still help and ``may_retry``; otherwise every outcome is published."""
        stored = self._stored(request.request_id)
        republished = stored is not None
        if stored is None:
            assessed = self._moderate(request)
            if assessed.error is not None and assessed.error.retryable and may_retry:
                raise TransientFailure(assessed.error)
            stored = self._store(assessed, may_retry)
        else:
            log.info("re-delivery: publishing the stored result", request_id=request.request_id)
        result = self._act(stored, may_retry)
        return self._publish(request, result, may_retry, republished=republished)

    def _act(self, stored: ModerationResult, may_retry: bool) -> ModerationResult:
        """Take the verdict's quarantine action, unless a delivery before took it. Idempotent:
        after a crash it finishes what the first delivery began and gives the same result,
        which then replaces the stored one, so a later re-delivery leaves the source alone."""
        if not self.pipeline.action_pending(stored):
            return stored
        result = self.pipeline.apply_action(stored)
        if result.error is not None:
            finished = self._finished_elsewhere(stored.request_id)
            if finished is not None:
                return finished
            if result.error.retryable and may_retry:
                raise TransientFailure(result.error)
            return result
        if self.results is not None:
            try:
                self.results.replace(result.request_id, result.model_dump_json())
            except CacheUnavailable as exc:
                log.warning(
                    "result store unavailable", request_id=result.request_id, error=str(exc)
                )
        return result

    def _finished_elsewhere(self, request_id: str) -> ModerationResult | None:
        """Two deliveries of one request can run at once (a re-send, a redelivery while the
        first still runs): when the other finished the action first, its result is the one."""
        stored = self._stored(request_id)
        if stored is None or self.pipeline.action_pending(stored):
            return None
        log.info("action finished by a concurrent delivery", request_id=request_id)
        return stored

    def fail(self, request: ModerationRequest, exc: PermanentError) -> Handled:
        """Publish an error result for a request that cannot be moderated at all."""
        result = error_result(request.request_id, request.image, exc.code, str(exc))
        result = result.model_copy(update={"metadata": request.metadata})
        return self._publish(request, self._store(result, False), False, republished=False)

    def _moderate(self, request: ModerationRequest) -> ModerationResult:
        try:
            policy = self._policy(request.policy)
        except InvalidRequest as exc:
            result = error_result(request.request_id, request.image, exc.code, str(exc))
        else:
            result = self.pipeline.process(
                request.image, request.request_id, policy=policy, embed=request.embed, act=False
            )
        return result.model_copy(update={"metadata": request.metadata})

    def _policy(self, name: str | None) -> Policy | None:
        if name is None:
            return None
        try:
            return self.policies[name]
        except KeyError:
            # Requests may only name policies the operator configured: never a file path.
            raise InvalidRequest(
                f"unknown policy {name!r}; this worker has {', '.join(sorted(self.policies))}"
            ) from None

    def _stored(self, request_id: str) -> ModerationResult | None:
        if self.results is None:
            return None
        try:
            text = self.results.get(request_id)
        except CacheUnavailable as exc:
            log.warning("result store unavailable", request_id=request_id, error=str(exc))
            return None
        return None if text is None else ModerationResult.model_validate_json(text)

    def _store(self, result: ModerationResult, may_retry: bool) -> ModerationResult:
        """Keep the result so a re-delivery re-publishes it; when a racing delivery stored one
        first, that one is the result. A source is never moved without this record while a
        retry can still wait for the store: a re-delivery would find the image gone."""
        if self.results is None:
            return result
        try:
            text = self.results.put_if_absent(result.request_id, result.model_dump_json())
        except CacheUnavailable as exc:
            if may_retry and self.pipeline.moves_source(result):
                raise TransientFailure(
                    ErrorInfo(code=exc.code, message=str(exc), retryable=True)
                ) from exc
            log.warning("result store unavailable", request_id=result.request_id, error=str(exc))
            return result
        return ModerationResult.model_validate_json(text)

    def _publish(
        self,
        request: ModerationRequest,
        result: ModerationResult,
        may_retry: bool,
        *,
        republished: bool,
    ) -> Handled:
        dead_letter = result.error.code if result.status is Status.ERROR and result.error else None
        callback = request.callback or self.default_callback
        if callback is None:
            return Handled(result, dead_letter, republished)
        try:
            self.publisher.publish(callback, result)
        except InvalidCallback as exc:
            log.warning("callback refused", request_id=request.request_id, error=str(exc))
            return Handled(result, exc.code, republished)
        except RetryableError as exc:
            if may_retry:
                raise
            log.error("callback failed for good", request_id=request.request_id, error=str(exc))
            return Handled(result, exc.code, republished)
        metrics.PUBLISHED.labels(urlsplit(callback).scheme, result.status.value).inc()
        return Handled(result, dead_letter, republished)


def error_result(request_id: str, image: str, code: str, message: str) -> ModerationResult:
    return ModerationResult(
        request_id=request_id,
        image=image,
        status=Status.ERROR,
        error=ErrorInfo(code=code, message=message, retryable=False),
    )
