"""One moderation request, start to finish, with the delivery rules of queue mode.

    request ─▶ stored final result? ─yes──────────────────────────────┐ (a re-delivery)
                  │ no                                                 ▼
                  └─▶ lease (wait while another delivery holds it) ─▶ count the delivery
                        ─▶ too many? ─yes─▶ too_many_deliveries ─┐
                              │ no                               ▼
                              └─▶ assess ─▶ store once ─▶ act ─▶ publish
                                                                  │ error result or
                                                                  ▼ undeliverable
                                                             dead letter

Only the holder of a request's lease (``worker.cache.leases``) fetches, classifies and acts;
another delivery of the same request waits, then publishes the holder's stored result, so
overlapping deliveries publish one result and take one action. The look at the stored result,
the lease and a fresh request's count are one atomic step (``LeaseKeeper.start``, one round
trip to Redis); a stored result whose action is still due is taken over with a second one.
The verdict is stored (first writer wins) before the source is touched and before anything
is published; a delivery that takes over from a dead holder finds it and finishes the
quarantine action, idempotently (``Actions.finish``).

Deliveries that start work are counted; a count that survives its delivery means the process
died holding the request. A request with such a history runs alone in this process (so a
crash it causes counts against it, not against its neighbours), and once its count passes
``max_deliveries`` it is answered with ``too_many_deliveries`` before any work. Knows nothing
of Celery: the task maps ``RetryableError`` to a retry and returns (acks) only after
``handle`` has published.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from worker import metrics
from worker.actions import Assessed
from worker.cache.leases import LeaseKeeper
from worker.cache.results import ResultStore
from worker.callbacks import Publisher, answer_id
from worker.errors import (
    CacheUnavailable,
    InternalError,
    InvalidCallback,
    InvalidRequest,
    ModqError,
    PermanentError,
    RetryableError,
    TooManyDeliveries,
)
from worker.log import get_logger
from worker.messages import ErrorInfo, ModerationRequest, ModerationResult, Status
from worker.pipeline import Pipeline
from worker.policy import Policy

__all__ = ["DeliveryRules", "Handled", "LeaseBusy", "ModerationService", "error_result"]

log = get_logger(__name__)


class LeaseBusy(RetryableError):
    """Another delivery of the request has held its lease for longer than a delivery waits."""

    code = "lease_busy"


@dataclass(frozen=True)
class DeliveryRules:
    #: deliveries whose process died holding the request before it is answered with an error
    max_deliveries: int = 3
    #: how long a delivery waits for another one holding the request's lease
    lease_wait_s: float = 300.0
    lease_poll_s: float = 0.1


@dataclass(frozen=True)
class _Turn:
    """This delivery's turn at a request."""

    #: the result stored when the delivery came for it (or took its lease)
    stored: ModerationResult | None
    #: this delivery's lease token; None while it holds no lease
    token: str | None = None
    #: deliveries before this one whose process died holding the request
    standing: int = 0
    #: False when leases cannot be kept (none configured, or their store is unreachable)
    kept: bool = True


@dataclass(frozen=True)
class Handled:
    result: ModerationResult
    #: the request and result belong in the dead-letter queue (why, as a stable code)
    dead_letter: str | None = None
    #: a re-delivery: the stored result was published again, nothing was re-run
    republished: bool = False
    #: a broker, stream or endpoint took the result (not: no callback, or it refused)
    published: bool = False


class ModerationService:
    def __init__(
        self,
        pipeline: Pipeline,
        publisher: Publisher,
        results: ResultStore | None,
        policies: dict[str, Policy],
        default_callback: str | None = None,
        leases: LeaseKeeper | None = None,
        rules: DeliveryRules | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.actions = pipeline.actions
        self.publisher = publisher
        self.results = results
        self.policies = policies
        self.default_callback = default_callback
        self.leases = leases
        self.rules = rules or DeliveryRules()
        #: requests whose earlier deliveries died with their process run one at a time
        self._suspects = threading.Lock()

    def handle(self, request: ModerationRequest, *, may_retry: bool) -> Handled:
        """Moderate ``request`` and publish its one result. Raises ``RetryableError`` when a
        retry may still help and ``may_retry``; otherwise every outcome is published."""
        turn = self._wait_for_turn(request.request_id)
        if isinstance(turn, ModerationResult):
            log.info("re-delivery: publishing the stored result", request_id=request.request_id)
            return self._publish(request, turn, may_retry, republished=True)
        try:
            if turn.standing:
                # An earlier delivery died holding this request: run it alone, so that if it
                # kills this process too, the requests beside it are not blamed.
                with self._suspects:
                    # The wait may have been long: what was stored meanwhile is the answer.
                    stored = self._stored(request.request_id) or turn.stored
                    turn = replace(turn, stored=stored)
                    return self._handle_guarded(request, may_retry, turn)
            return self._handle_guarded(request, may_retry, turn)
        finally:
            self._release(request.request_id, turn.token)

    def _handle_guarded(self, request: ModerationRequest, may_retry: bool, turn: _Turn) -> Handled:
        """A bug is retried like a transient failure; on the last attempt it becomes an
        ``internal`` error result, published while this delivery still holds the lease."""
        try:
            return self._handle_leased(request, may_retry, turn)
        except RetryableError:
            raise
        except Exception as exc:
            if may_retry:
                raise
            log.exception("unexpected error on the last attempt", request_id=request.request_id)
            leased = turn.token is not None
            return self.fail(request, InternalError(f"internal error: {exc!r}"), leased=leased)

    def _wait_for_turn(self, request_id: str) -> ModerationResult | _Turn:
        """The final stored result, or this delivery's turn at the request."""
        deadline = time.monotonic() + self.rules.lease_wait_s
        take_over = False
        while True:
            turn = self._look(request_id, take_over)
            if turn.token is not None:
                return turn
            if turn.stored is not None and self.actions.due(turn.stored) is None:
                return turn.stored
            if not turn.kept:
                return turn
            if turn.stored is not None and not take_over:
                take_over = True  # an action left unfinished: take the lease to finish it
                continue
            if time.monotonic() > deadline:
                raise LeaseBusy(
                    f"another delivery of {request_id} has worked on it for over "
                    f"{self.rules.lease_wait_s:g} s"
                )
            time.sleep(self.rules.lease_poll_s)

    def _look(self, request_id: str, take_over: bool) -> _Turn:
        """The stored result and, unless there is one (or ``take_over``), the lease, counted
        as a delivery that starts work: one atomic step. Without leases, the stored result."""
        if self.leases is None:
            return _Turn(self._stored(request_id), kept=False)
        try:
            found = self.leases.start(request_id, take_over=take_over)
        except CacheUnavailable as exc:
            log.warning("lease store unavailable", request_id=request_id, error=str(exc))
            return _Turn(self._stored(request_id), kept=False)
        try:
            stored = None if found.stored is None else _parse(found.stored)
        except BaseException:
            # A stored result this version cannot read: the lease must not be kept forever.
            self._release(request_id, found.token)
            raise
        return _Turn(stored, found.token, found.standing)

    def _release(self, request_id: str, token: str | None) -> None:
        if self.leases is not None and token is not None:
            self.leases.release(request_id, token)  # retried by the keeper if Redis is away

    def _handle_leased(self, request: ModerationRequest, may_retry: bool, turn: _Turn) -> Handled:
        # The turn's look at the stored result came with the lease, atomically: a result
        # stored since (a holder that lost its lease) is found by ``_store``.
        stored = turn.stored
        if stored is None:
            count = self._count_delivery(request.request_id, turn)
            if count > self.rules.max_deliveries:
                return self.fail(request, _too_many(request.request_id, count - 1), leased=True)
            assessed = self._assess(request, may_retry)
            stored = self._store(assessed.result, may_retry)
            # A racing delivery may have stored first: its result is the answer, for the
            # same image, so this delivery's bytes and embedding serve its actions.
            result = self._act(Assessed(stored, assessed.data, assessed.embedding), may_retry)
            return self._publish(request, result, may_retry, republished=False)
        if self.actions.due(stored) is not None:
            log.info("taking over an unfinished action", request_id=request.request_id)
        else:  # the holder finished between our look at the store and the lease
            log.info("re-delivery: publishing the stored result", request_id=request.request_id)
        result = self._act(Assessed(stored), may_retry)
        return self._publish(request, result, may_retry, republished=True)

    def _assess(self, request: ModerationRequest, may_retry: bool) -> Assessed:
        """The request's assessment, or its error result once no retry may help."""
        try:
            policy = self._policy(request.policy)
            assessed = self.pipeline.assess(
                request.image, request.request_id, policy=policy, embed=request.embed
            )
        except ModqError as exc:
            if exc.retryable and may_retry:
                raise
            assessed = Assessed(self.pipeline.error_result(request.image, request.request_id, exc))
        return Assessed(
            assessed.result.model_copy(update={"metadata": request.metadata}),
            assessed.data,
            assessed.embedding,
        )

    def _count_delivery(self, request_id: str, turn: _Turn) -> int:
        """This delivery's count. ``start`` counted a fresh request's; one with a count
        standing is counted only now that it runs alone: had it been counted while it waited,
        a crash of the request before it would count against it too."""
        if self.leases is None or turn.token is None:
            return 0
        if not turn.standing:
            return 1
        try:
            return self.leases.store.begin(request_id)
        except CacheUnavailable as exc:
            log.warning("delivery not counted", request_id=request_id, error=str(exc))
            return 0

    def _act(self, assessed: Assessed, may_retry: bool) -> ModerationResult:
        """Take the actions the stored result calls for, unless a delivery before took them.
        Idempotent: after a crash it finishes what the first delivery began and gives the
        same result, which then replaces the stored one, so a later re-delivery leaves the
        source alone."""
        stored = assessed.result
        try:
            result = self.actions.act(assessed)
        except ModqError as exc:
            finished = self._finished_elsewhere(stored.request_id)
            if finished is not None:
                return finished
            if exc.retryable and may_retry:
                raise
            # The action failed for good: the error is the answer, for later deliveries too.
            failed = self.pipeline.error_result(stored.image, stored.request_id, exc)
            result = failed.model_copy(update={"metadata": stored.metadata})
        if result != stored and self.results is not None:
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
        if stored is None or self.actions.due(stored) is not None:
            return None
        log.info("action finished by a concurrent delivery", request_id=request_id)
        return stored

    def fail(self, request: ModerationRequest, exc: PermanentError, *, leased: bool) -> Handled:
        """Publish an error result for a request that cannot be moderated at all: the last
        word on it, so the record is best effort and only the publication must succeed. A
        stored verdict wins, except one whose action never completed, which only a delivery
        holding the lease (``leased``) may replace with the error."""
        result = error_result(request.request_id, request.image, exc.code, str(exc))
        result = result.model_copy(update={"metadata": request.metadata})
        try:
            stored = self._store(result, False)
            if leased and stored.status is Status.OK and self.actions.due(stored) is not None:
                # A verdict whose action never completed is not an answer: the error is.
                if self.results is not None:
                    self.results.replace(result.request_id, result.model_dump_json())
                stored = result
        except Exception as store_exc:
            log.warning(
                "error result not stored", request_id=request.request_id, error=repr(store_exc)
            )
            stored = result
        return self._publish(request, stored, False, republished=False)

    def answer(self, request: ModerationRequest, exc: PermanentError) -> Handled:
        """Publish an error result and store nothing: for a message that failed validation,
        whose request id is only a claim, and for the last resort outside any lease."""
        result = error_result(request.request_id, request.image, exc.code, str(exc))
        result = result.model_copy(update={"metadata": request.metadata or {}})
        with answer_id():  # not the stored result: a delivery id of its own (webhook-id)
            return self._publish(request, result, False, republished=False)

    def refuse_callback(self, request: ModerationRequest) -> Handled | None:
        """A callback no result could ever reach (a reserved queue or stream name): answered
        ``invalid_callback`` before any work, so nothing is fetched, classified or moved for
        a result that has nowhere to go. The error result is dead-lettered, not stored."""
        callback = request.callback or self.default_callback
        check = getattr(self.publisher, "check", None)
        if callback is None or check is None:
            return None
        try:
            check(callback)
        except InvalidCallback as exc:
            log.warning("callback refused", request_id=request.request_id, error=str(exc))
            result = error_result(request.request_id, request.image, exc.code, str(exc))
            result = result.model_copy(update={"metadata": request.metadata or {}})
            return Handled(result, exc.code)
        return None

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
        return None if text is None else _parse(text)

    def _store(self, result: ModerationResult, may_retry: bool) -> ModerationResult:
        """Keep the result so a re-delivery re-publishes it; when a racing delivery stored one
        first, that one is the result. A source is never moved without this record while a
        retry can still wait for the store: a re-delivery would find the image gone."""
        if self.results is None:
            return result
        sent = result.model_dump_json()
        try:
            text = self.results.put_if_absent(result.request_id, sent)
        except CacheUnavailable as exc:
            if may_retry and self.actions.due(result) == "move":
                raise
            log.warning("result store unavailable", request_id=result.request_id, error=str(exc))
            return result
        return result if text == sent else _parse(text)  # ours, or the first writer's

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
        _count_published(callback, result)
        return Handled(result, dead_letter, republished, published=True)


def _parse(text: str) -> ModerationResult:
    return ModerationResult.model_validate_json(text)


def _count_published(callback: str, result: ModerationResult) -> None:
    """Only what a broker, stream or endpoint took counts: modq_verdicts_total and
    modq_errors_total say what callers were told, not what the pipeline computed."""
    metrics.PUBLISHED.labels(urlsplit(callback).scheme, result.status.value).inc()
    if result.error is not None:
        metrics.ERRORS.labels(result.error.code).inc()
    elif result.verdict is not None:
        metrics.VERDICTS.labels(result.verdict.value).inc()


def _too_many(request_id: str, died: int) -> TooManyDeliveries:
    return TooManyDeliveries(
        f"{died} deliveries of {request_id} ended with their worker process dying before "
        "they finished (out of memory or a crash); answered without running it again"
    )


def error_result(request_id: str, image: str, code: str, message: str) -> ModerationResult:
    return ModerationResult(
        request_id=request_id,
        image=image,
        status=Status.ERROR,
        error=ErrorInfo(code=code, message=message, retryable=False),
    )
