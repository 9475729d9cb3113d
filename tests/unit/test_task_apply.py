"""The Celery task in process, with ``Task.apply()``: no broker, no worker process, a fake
model. What a real worker does with the same messages is tested in tests/integration."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

import worker.queue.tasks  # registers modq.moderate with every app, as the worker imports it
import worker.runtime
from worker.actions import Actions
from worker.cache import MemoryResultStore
from worker.callbacks import MemoryPublisher
from worker.config import Settings
from worker.decode.pool import InProcessDecoder
from worker.errors import StorageUnavailable
from worker.messages import DEAD_LETTER_TASK, MODERATE_TASK, Status, Verdict
from worker.models.fake import FakeBackend, image_with_score
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.queue.app import create_app
from worker.queue.service import ModerationService
from worker.runtime import Runtime
from worker.storage import MemoryStore

HOOK = "https://hooks.example.com/modq"
DEFAULT = Policy("default", 0.5, 0.85)


def _png(score: float) -> bytes:
    import io

    out = io.BytesIO()
    image_with_score(score).save(out, "PNG")
    return out.getvalue()


class FlakyStore(MemoryStore):
    """Fails the first ``failures`` reads like an S3 answering 503."""

    def __init__(self, objects: dict[str, bytes], failures: int = 0) -> None:
        super().__init__(objects)
        self.failures = failures
        self.reads = 0

    def read(self, ref: str, max_bytes: int) -> bytes:
        self.reads += 1
        if self.reads <= self.failures:
            raise StorageUnavailable("S3 answered 503")
        return super().read(ref, max_bytes)


@dataclass
class Harness:
    app: Celery
    store: FlakyStore
    publisher: MemoryPublisher
    dead_letters: list[dict[str, Any]]

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        return self.app.tasks[MODERATE_TASK].apply(args=args, kwargs=kwargs, task_id="t-1")


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    settings = Settings(broker_url="memory://", cache_url=None, max_retries=2, pending_sweep_s=0)
    app = create_app(settings, worker=True)
    dead_letters: list[dict[str, Any]] = []

    def send_task(name: str, args: list[Any], **options: Any) -> None:
        assert name == DEAD_LETTER_TASK and options["queue"] == settings.dead_letter_queue
        dead_letters.append(args[0])

    monkeypatch.setattr(app, "send_task", send_task)
    store = FlakyStore({"s3://uploads/red.png": _png(0.99), "s3://uploads/green.png": _png(0.02)})
    backend = FakeBackend()
    pipeline = Pipeline(
        backend, store, DEFAULT, actions=Actions(), options=PipelineOptions(max_wait_ms=1)
    )
    publisher = MemoryPublisher()
    policies = {"default": DEFAULT}
    service = ModerationService(pipeline, publisher, MemoryResultStore(), policies)
    runtime = Runtime(settings, backend, pipeline, policies, InProcessDecoder(), service=service)
    monkeypatch.setattr(worker.runtime, "_runtime", runtime)
    try:
        yield Harness(app, store, publisher, dead_letters)
    finally:
        pipeline.close()


def test_a_request_is_moderated_and_published_before_the_task_returns(harness: Harness) -> None:
    outcome = harness.apply(
        {"request_id": "r-1", "image": "s3://uploads/red.png", "callback": HOOK}
    )
    assert outcome.successful()
    assert outcome.result == {"request_id": "r-1", "status": "ok"}
    [(callback, result)] = harness.publisher.published
    assert callback == HOOK and result.verdict is Verdict.BLOCK
    assert result.model is not None and result.model.id == "modq/fake"
    assert harness.dead_letters == []


def test_the_message_may_come_as_the_keyword_message(harness: Harness) -> None:
    message = {"request_id": "r-2", "image": "s3://uploads/green.png", "callback": HOOK}
    assert harness.apply(message=message).result["status"] == "ok"
    assert harness.publisher.published[0][1].verdict is Verdict.ALLOW


def test_an_invalid_message_is_answered_and_dead_lettered(harness: Harness) -> None:
    outcome = harness.apply({"request_id": "r-3", "image": "ftp://x/y.png", "callback": HOOK})
    assert outcome.result == {"request_id": "r-3", "status": "error"}
    [(_, result)] = harness.publisher.published
    assert result.error is not None and result.error.code == "invalid_request"
    [letter] = harness.dead_letters
    assert letter["reason"] == "invalid_request" and letter["request"]["request_id"] == "r-3"


def test_a_misshapen_call_is_an_invalid_request(harness: Harness) -> None:
    outcome = harness.apply({"request_id": "r-4"}, "extra")
    assert outcome.result["status"] == "error"
    assert harness.dead_letters[0]["reason"] == "invalid_request"


def test_a_transient_failure_is_retried_then_answered(harness: Harness) -> None:
    harness.store.failures = 2  # two 503s, then the object reads
    outcome = harness.apply(
        {"request_id": "r-5", "image": "s3://uploads/red.png", "callback": HOOK}
    )
    assert outcome.result == {"request_id": "r-5", "status": "ok"}
    assert harness.store.reads == 3
    [(_, result)] = harness.publisher.published  # one answer, after the retries
    assert result.status is Status.OK


def test_retries_run_out_into_a_published_retryable_error(harness: Harness) -> None:
    harness.store.failures = 100
    outcome = harness.apply(
        {"request_id": "r-6", "image": "s3://uploads/red.png", "callback": HOOK}
    )
    assert outcome.result == {"request_id": "r-6", "status": "error"}
    assert harness.store.reads == 3  # the first attempt and max_retries=2 retries
    [(_, result)] = harness.publisher.published
    assert result.error is not None
    assert result.error.code == "storage_unavailable" and result.error.retryable
    assert harness.dead_letters[0]["reason"] == "storage_unavailable"
