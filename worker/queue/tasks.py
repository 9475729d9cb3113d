"""The Celery tasks: thin. Validate the message, bind log context, hand it to the service,
map typed errors to retry or dead letter. The message is acked when the task returns, which
is after its result was published.
"""

from __future__ import annotations

import random
import time
from typing import Any, NoReturn

import structlog
from celery import Task, shared_task
from celery.exceptions import Reject, Retry
from celery.signals import (
    celeryd_init,
    setup_logging,
    task_revoked,
    worker_init,
    worker_shutdown,
)
from pydantic import ValidationError

from worker import metrics
from worker.config import MetricsSettings, Settings
from worker.errors import (
    ConfigError,
    InternalError,
    InvalidRequest,
    PermanentError,
    RetryableError,
)
from worker.log import configure_logging, get_logger
from worker.messages import DEAD_LETTER_TASK, MODERATE_TASK, ModerationRequest
from worker.queue.app import check_visibility_timeout
from worker.queue.service import Handled, ModerationService, error_result
from worker.runtime import Runtime, close_runtime, current_runtime, get_runtime

__all__ = ["EXIT_UNREADY", "backoff_seconds", "exit_unready", "moderate"]

log = get_logger(__name__)

#: the exit status of a worker that cannot build its runtime (and so took no message)
EXIT_UNREADY = 3


def backoff_seconds(retries: int, cap: int) -> float:
    """Capped exponential backoff with full jitter: 1, 2, 4 … seconds, at most ``cap``."""
    return random.uniform(0.5, 1.0) * min(float(cap), 2.0**retries)


def _settings(task: Task) -> Settings:
    settings = getattr(task.app.conf, "modq_settings", None)
    return settings if isinstance(settings, Settings) else Settings()


def _runtime(task: Task) -> Runtime:
    """This process's runtime. The worker builds it before it consumes (``worker_init``); a
    task that finds none builds it, and when that fails the message goes back to the queue
    rather than being acked with no answer."""
    runtime = current_runtime()
    if runtime is not None:
        return runtime
    try:
        return get_runtime(_settings(task), task.app.send_task)
    except Exception as exc:
        log.error("cannot moderate: the runtime cannot be built", error=str(exc))
        raise Reject(f"no runtime: {exc}", requeue=True) from exc


def _service(runtime: Runtime) -> ModerationService:
    assert runtime.service is not None, "a worker's runtime is built with send_task"
    return runtime.service


@shared_task(bind=True, name="modq.moderate", max_retries=None)  # type: ignore[untyped-decorator]
def moderate(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    # Any argument shape is taken, so that a message from a foreign producer with the wrong
    # one is answered as an invalid request instead of failing before this body runs.
    runtime = _runtime(self)
    message = _the_message(args, kwargs)
    try:
        if message is _MISSHAPEN:
            error = InvalidRequest(
                f"{MODERATE_TASK} takes one argument, the request; got {len(args)} "
                f"positional and {sorted(kwargs)[:5]} keyword argument(s)"
            )
            return _answer_raw(self, runtime, {"args": list(args), "kwargs": kwargs}, error)
        return _moderate(self, runtime, message)
    except (Retry, Reject):
        raise
    except Exception as exc:
        # Whatever escaped the steps below (a dead-letter send on a lost broker, a failing
        # error publication) must not ack the message without an answer: retry it, and with
        # no retries left put it back on the queue.
        log.exception("unexpected error outside the service", attempt=self.request.retries + 1)
        if self.request.retries < runtime.settings.max_retries:
            raise _retry(self, runtime.settings, InternalError.code, exc) from exc
        return _answer_at_last(self, runtime, message, exc)


_MISSHAPEN = object()


def _the_message(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"message"}:
        return kwargs["message"]
    return _MISSHAPEN


def _answer_at_last(task: Task, runtime: Runtime, message: Any, exc: Exception) -> dict[str, Any]:
    """Retries ran out on a failure nothing handled: answer ``internal`` from the message as
    it came; if even that cannot be published, the message goes back to the queue (after a
    backoff's pause, so a broken callback does not spin)."""
    try:
        return _answer_raw(task, runtime, message, InternalError(f"internal error: {exc!r}"))
    except Exception as again:
        log.error("no answer could be published; requeueing", error=repr(again))
        time.sleep(backoff_seconds(task.request.retries, runtime.settings.retry_backoff_max_s))
        raise Reject(f"unanswered: {again!r}", requeue=True) from again


def _moderate(task: Task, runtime: Runtime, message: Any) -> dict[str, Any]:
    settings = runtime.settings
    try:
        request = ModerationRequest.model_validate(message)
    except ValidationError as exc:
        return _reject_invalid(task, runtime, message, exc)
    with structlog.contextvars.bound_contextvars(
        request_id=request.request_id, model=settings.model, task_id=task.request.id
    ):
        may_retry = task.request.retries < settings.max_retries
        refused = _service(runtime).refuse_callback(request)
        if refused is not None:  # nowhere to answer: dead-lettered before any work
            _after_publishing(task, runtime, message, refused, may_retry=may_retry)
            return {"request_id": request.request_id, "status": refused.result.status.value}
        try:
            handled = _service(runtime).handle(request, may_retry=may_retry)
        except RetryableError as exc:
            raise _retry(task, settings, exc.code, exc) from exc
        except Exception as exc:
            # A bug must not ack a message without an answer: retry it like a transient
            # failure, and when retries run out publish an ``internal`` error result.
            log.exception("unexpected error", attempt=task.request.retries + 1)
            if may_retry:
                raise _retry(task, settings, InternalError.code, exc) from exc
            handled = _service(runtime).answer(request, InternalError(f"internal error: {exc!r}"))
        _after_publishing(task, runtime, message, handled, may_retry=may_retry)
        result = handled.result
        log.info(
            "published" if handled.published else "not published",
            status=result.status,
            verdict=result.verdict,
            sha256=result.hashes.sha256 if result.hashes else None,
            cache=result.cache.outcome if result.cache else None,
            error=result.error.code if result.error else None,
            republished=handled.republished,
        )
    return {"request_id": request.request_id, "status": handled.result.status.value}


def _retry(task: Task, settings: Settings, code: str, exc: Exception) -> Exception:
    """Schedule the next attempt with capped backoff; returns the exception to raise."""
    countdown = backoff_seconds(task.request.retries, settings.retry_backoff_max_s)
    log.warning(
        "retrying",
        code=code,
        error=str(exc),
        attempt=task.request.retries + 1,
        countdown=round(countdown, 2),
    )
    metrics.RETRIES.labels(code).inc()
    _renew(_runtime(task), task.request.id)
    try:
        retry: Exception = task.retry(countdown=countdown)
    except Reject as exc:
        # Celery rejects the message *without* requeue when it cannot publish the retry
        # (the broker is down or still loading): that would drop the request. Requeue it
        # instead; if even the reject cannot reach the broker, the message stays unacked
        # and comes back after the visibility timeout.
        log.warning("retry not published; requeueing the message", error=str(exc.reason))
        requeue: Exception = Reject(exc.reason, requeue=True)
        return requeue
    return retry


def _reject_invalid(
    task: Task, runtime: Runtime, message: Any, exc: ValidationError
) -> dict[str, Any]:
    error = InvalidRequest(
        f"invalid request: {exc.error_count()} problem(s): {exc.errors()[0]['msg']}"
    )
    return _answer_raw(task, runtime, message, error)


def _answer_raw(
    task: Task, runtime: Runtime, message: Any, error: PermanentError
) -> dict[str, Any]:
    """A message that cannot be handled as a request still gets an answer where one can be
    given: an error result at its callback when the callback itself is valid, and the dead
    letter."""
    fields = message if isinstance(message, dict) else {}
    request_id = str(fields.get("request_id") or task.request.id)[:128]
    image = str(fields.get("image", ""))[:4096]
    log.warning("answering with an error", request_id=request_id, error=str(error))
    handled = Handled(error_result(request_id, image, error.code, str(error)), error.code)
    callback = fields.get("callback")
    try:
        probe = ModerationRequest(request_id="probe", image="file:///", callback=callback)
    except ValidationError:
        probe = None
    if probe is not None:  # an invalid callback is no place to answer
        handled = _service(runtime).answer(
            ModerationRequest.model_construct(
                request_id=request_id, image=image, callback=probe.callback, metadata={}
            ),
            error,
        )
    _after_publishing(task, runtime, message, handled, may_retry=False)
    return {"request_id": request_id, "status": "error"}


def _after_publishing(
    task: Task, runtime: Runtime, message: Any, handled: Handled, *, may_retry: bool
) -> None:
    """The answer is out: nothing that fails from here may publish a different one. A dead
    letter that cannot be sent is retried while retries remain (the re-delivery re-publishes
    the stored result, then sends it); the producers' record is best effort."""
    try:
        _dead_letter(task, runtime.settings, message, handled)
    except Exception as exc:
        if may_retry:
            raise _retry(task, runtime.settings, "dead_letter_failed", exc) from exc
        log.error("dead letter lost; the result was published", error=repr(exc))
    try:
        _forget(runtime, task.request.id)
    except Exception as exc:  # at worst the sweep re-sends it and the same result goes out
        log.warning("pending-request record not updated", verb="forget", error=repr(exc))


def _forget(runtime: Runtime, task_id: str) -> None:
    """The result is out: the request leaves the producers' record before its ack (if this
    fails, the sweeper re-sends it and the re-delivery re-publishes the stored result)."""
    _tend_record(runtime, "forget", task_id)


def _renew(runtime: Runtime, task_id: str) -> None:
    """A retry goes to the back of the queue: give it a new place in the record first, or
    the sweeper would take it, waiting behind a backlog, for one the broker lost."""
    _tend_record(runtime, "renew", task_id)


def _tend_record(runtime: Runtime, verb: str, task_id: str) -> None:
    if runtime.pending is None:
        return
    try:
        getattr(runtime.pending, verb)(task_id)
    except Exception as exc:  # the result is out; at worst the sweep re-sends it once more
        log.warning("pending-request record not updated", verb=verb, error=repr(exc))


def _dead_letter(task: Task, settings: Settings, message: Any, handled: Handled) -> None:
    if handled.dead_letter is None:
        return
    metrics.DEAD_LETTERS.labels(handled.dead_letter).inc()
    task.app.send_task(
        DEAD_LETTER_TASK,
        args=[
            {
                "reason": handled.dead_letter,
                "request": message,
                "result": handled.result.model_dump(mode="json"),
            }
        ],
        queue=settings.dead_letter_queue,
    )


@worker_init.connect  # type: ignore[untyped-decorator]
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Before the consumer starts: refuse a risky visibility timeout, build the whole runtime
    (model, policies, stores, cache, banks, quarantine, publishers), start the metrics
    endpoint. A worker that cannot moderate exits here, having taken no message."""
    app = sender.app if sender is not None and hasattr(sender, "app") else None
    settings = _settings_of(app.conf if app is not None else None)
    configure_logging(settings.log_level, json=settings.logging.writes_json(worker=True))
    if app is None:
        return
    try:
        check_visibility_timeout(settings)
        _check_pool(getattr(sender, "pool_cls", None))
        runtime = get_runtime(settings, app.send_task)
        if settings.metrics.port:
            _serve_metrics(settings.metrics, runtime)
        runtime.start_sweeper(app.send_task)
    except Exception as exc:
        # Celery logs and swallows exceptions from signal handlers, then consumes anyway:
        # only leaving the process keeps the messages on the queue.
        exit_unready(exc)


def _serve_metrics(where: MetricsSettings, runtime: Runtime) -> None:
    from prometheus_client import start_http_server

    metrics.BUILD_INFO.info(_build_info(runtime))
    try:
        start_http_server(where.port, addr=where.addr)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise ConfigError(
            f"MODQ_METRICS_ADDR={where.addr} MODQ_METRICS_PORT="
            f"{where.port}: cannot serve metrics there: {exc.strerror or exc}"
        ) from exc


def _build_info(runtime: Runtime) -> dict[str, str]:
    """``modq_build_info``'s labels: what a dashboard needs to tell workers apart."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        modq_version = version("modq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        modq_version = "unknown"
    model = runtime.pipeline.model
    return {
        "version": modq_version,
        "model": model.id,
        "revision": model.revision,
        "runtime": model.runtime,
        "precision": model.precision,
        "python": platform.python_version(),
    }


def _settings_of(conf: Any) -> Settings:
    settings = getattr(conf, "modq_settings", None)
    return settings if isinstance(settings, Settings) else Settings()


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _on_celeryd_init(conf: Any = None, **_: Any) -> None:
    """The worker's first signal, before Celery's own start-up warnings (running as root):
    from here on every line on stderr is in modq's one format."""
    settings = _settings_of(conf)
    configure_logging(settings.log_level, json=settings.logging.writes_json(worker=True))


@setup_logging.connect  # type: ignore[untyped-decorator]
def _on_setup_logging(**_: Any) -> None:
    """Celery installs no handler of its own and leaves stdout and stderr alone while this
    receiver exists: its lines go through modq's one handler, configured at
    ``celeryd_init``."""


def _check_pool(pool: object) -> None:
    """The runtime lives in this process, with its batcher and lease threads: a pool that
    forks children (prefork) would run tasks where those threads do not exist."""
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", str(pool))
    if not any(kind in str(name).lower() for kind in ("thread", "solo")):
        raise ConfigError(
            f"the {name} pool cannot run modq tasks: start the worker with --pool=threads "
            "(modq worker does)"
        )


def exit_unready(exc: Exception) -> NoReturn:
    """One clear error line, then exit non-zero: the worker takes no message."""
    log.error("worker cannot start", error=str(exc), code=getattr(exc, "code", "internal"))
    close_runtime()
    raise SystemExit(EXIT_UNREADY)


@task_revoked.connect  # type: ignore[untyped-decorator]
def _on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Celery acks a revoked or expired request without running it: no result will come,
    so the request leaves the producers' record rather than being re-sent."""
    runtime = current_runtime()
    if getattr(sender, "name", None) == "modq.moderate" and request is not None and runtime:
        _forget(runtime, request.id)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _on_worker_shutdown(**_: Any) -> None:
    close_runtime()
