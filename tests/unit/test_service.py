"""Delivery rules of one request, with the real pipeline on the fake model and the in-package
fakes (no ONNX Runtime): one result per request, re-deliveries re-publish it, retry vs. dead
letter by error kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import noise_jpeg
from worker.actions import Actions
from worker.cache import MemoryResultStore
from worker.callbacks import MemoryPublisher
from worker.errors import CacheUnavailable, CallbackFailed, InvalidCallback, StorageUnavailable
from worker.messages import ModerationRequest, Status, Verdict
from worker.models.backend import Backend
from worker.models.fake import FakeBackend
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.quarantine import LocalQuarantine
from worker.queue.service import ModerationService
from worker.storage import LocalStore, MemoryStore, file_ref

BLOCK_ALL = Policy("block-all", 0.0, 0.0)
ALLOW_ALL = Policy("allow-all", 1.0, 1.0)
HOOK = "redis-stream://results"


class CountingStore(MemoryStore):
    """A memory store that counts reads and can be told to fail like a dead S3."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.reads = 0
        self.down = False

    def read(self, ref: str, max_bytes: int) -> bytes:
        self.reads += 1
        if self.down:
            raise StorageUnavailable("S3 answered 503")
        return super().read(ref, max_bytes)


@pytest.fixture(scope="module")
def backend() -> Backend:
    return FakeBackend()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore({"s3://mem/a.jpg": noise_jpeg(1), "s3://mem/bad.jpg": noise_jpeg(4)[:400]})


def _service(
    backend: Backend, store: Any, publisher: MemoryPublisher, results: Any = None, **kw: Any
) -> Iterator[ModerationService]:
    actions = Actions(quarantine=kw.pop("quarantine", None))
    options = PipelineOptions(max_wait_ms=1)
    pipeline = Pipeline(backend, store, ALLOW_ALL, actions=actions, options=options, **kw)
    with pipeline:
        yield ModerationService(
            pipeline,
            publisher,
            MemoryResultStore() if results is None else results,
            {"allow-all": ALLOW_ALL, "block-all": BLOCK_ALL},
        )


@pytest.fixture
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def service(
    backend: Backend, store: CountingStore, publisher: MemoryPublisher
) -> Iterator[ModerationService]:
    yield from _service(backend, store, publisher)


def _request(image: str = "s3://mem/a.jpg", **kw: Any) -> ModerationRequest:
    return ModerationRequest(request_id="req-1", image=image, callback=HOOK, **kw)


def test_a_request_is_published_once_with_its_metadata(
    service: ModerationService, publisher: MemoryPublisher
) -> None:
    handled = service.handle(_request(metadata={"tenant": "t1"}), may_retry=True)
    assert handled.dead_letter is None and not handled.republished
    assert publisher.published == [(HOOK, handled.result)]
    assert handled.result.status is Status.OK
    assert handled.result.metadata == {"tenant": "t1"}


def test_a_redelivery_republishes_the_same_result_without_rerunning(
    service: ModerationService, publisher: MemoryPublisher, store: CountingStore
) -> None:
    first = service.handle(_request(), may_retry=True)
    reads = store.reads
    again = service.handle(_request(), may_retry=True)
    assert again.republished
    assert store.reads == reads, "a re-delivery must not fetch and classify again"
    assert again.result == first.result  # timings included: the very same result
    assert [r for _, r in publisher.published] == [first.result, first.result]


def test_a_redelivered_block_does_not_quarantine_twice(
    backend: Backend, tmp_path: Path, publisher: MemoryPublisher
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = uploads / "a.jpg"
    source.write_bytes(noise_jpeg(2))
    local = LocalStore([uploads])
    quarantine = LocalQuarantine(tmp_path / "quarantine", local)
    for service in _service(backend, local, publisher, quarantine=quarantine):
        request = ModerationRequest(
            request_id="req-b", image=file_ref(source), callback=HOOK, policy="block-all"
        )
        first = service.handle(request, may_retry=True)
        source.write_bytes(noise_jpeg(3))  # a new upload takes the name after the move
        again = service.handle(request, may_retry=True)
    assert first.result.verdict is Verdict.BLOCK
    assert first.result.action is not None and first.result.action.kind == "quarantine_move"
    assert again.result == first.result
    assert source.read_bytes() == noise_jpeg(3), "the re-delivery touched the new upload"


def test_a_retryable_failure_retries_then_publishes_an_error_and_dead_letters(
    service: ModerationService, publisher: MemoryPublisher, store: CountingStore
) -> None:
    store.down = True
    with pytest.raises(StorageUnavailable, match="503"):
        service.handle(_request(), may_retry=True)
    assert publisher.published == []
    handled = service.handle(_request(), may_retry=False)
    assert handled.result.error is not None
    assert handled.result.error.code == "storage_unavailable" and handled.result.error.retryable
    assert handled.dead_letter == "storage_unavailable"
    assert publisher.published == [(HOOK, handled.result)]


def test_a_permanent_failure_is_published_at_once_and_dead_lettered(
    service: ModerationService, publisher: MemoryPublisher
) -> None:
    for image, code in (("s3://mem/bad.jpg", "corrupt_image"), ("s3://mem/gone.jpg", "not_found")):
        handled = service.handle(
            ModerationRequest(request_id=code, image=image, callback=HOOK), may_retry=True
        )
        assert handled.result.error is not None and handled.result.error.code == code
        assert handled.dead_letter == code
    assert len(publisher.published) == 2


def test_a_failed_callback_retries_and_the_retry_publishes_the_stored_result(
    service: ModerationService, publisher: MemoryPublisher, store: CountingStore
) -> None:
    publisher.fail_next(CallbackFailed("redis down"))
    with pytest.raises(CallbackFailed):
        service.handle(_request(), may_retry=True)
    reads = store.reads
    handled = service.handle(_request(), may_retry=True)
    assert handled.republished and store.reads == reads
    assert [r for _, r in publisher.published] == [handled.result]


def test_an_undeliverable_result_goes_to_the_dead_letter_queue(
    service: ModerationService, publisher: MemoryPublisher
) -> None:
    publisher.fail_next(InvalidCallback("the receiver answered 400"))
    handled = service.handle(_request(), may_retry=True)
    assert handled.dead_letter == "invalid_callback"
    publisher.fail_next(CallbackFailed("still down"))
    assert service.handle(_request(), may_retry=False).dead_letter == "callback_failed"


def test_a_request_may_only_name_a_configured_policy(
    service: ModerationService, publisher: MemoryPublisher
) -> None:
    blocked = service.handle(
        ModerationRequest(request_id="p1", image="s3://mem/a.jpg", policy="block-all"),
        may_retry=True,
    )
    assert blocked.result.verdict is Verdict.BLOCK
    refused = service.handle(
        ModerationRequest(request_id="p2", image="s3://mem/a.jpg", policy="/etc/passwd"),
        may_retry=True,
    )
    assert refused.result.error is not None and refused.result.error.code == "invalid_request"
    assert refused.dead_letter == "invalid_request"


class DownResults(MemoryResultStore):
    """A result store whose Redis is unreachable until ``down`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def get(self, request_id: str) -> str | None:
        if self.down:
            raise CacheUnavailable("result store (redis) down")
        return super().get(request_id)

    def put_if_absent(self, request_id: str, result_json: str) -> str:
        if self.down:
            raise CacheUnavailable("result store (redis) down")
        return super().put_if_absent(request_id, result_json)


def _blocking_setup(tmp_path: Path) -> tuple[Path, LocalStore, LocalQuarantine]:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = uploads / "a.jpg"
    source.write_bytes(noise_jpeg(2))
    local = LocalStore([uploads])
    return source, local, LocalQuarantine(tmp_path / "quarantine", local)


def _blocked(source: Path, request_id: str = "req-m") -> ModerationRequest:
    return ModerationRequest(
        request_id=request_id, image=file_ref(source), callback=HOOK, policy="block-all"
    )


def test_no_move_without_a_stored_verdict_while_a_retry_can_wait(
    backend: Backend, tmp_path: Path, publisher: MemoryPublisher
) -> None:
    source, local, quarantine = _blocking_setup(tmp_path)
    results = DownResults()
    for service in _service(backend, local, publisher, results, quarantine=quarantine):
        with pytest.raises(CacheUnavailable):
            service.handle(_blocked(source), may_retry=True)
        assert source.exists() and publisher.published == []
        results.down = False
        handled = service.handle(_blocked(source), may_retry=True)
    assert handled.result.action is not None and handled.result.action.kind == "quarantine_move"
    assert not source.exists()


def test_on_the_last_attempt_a_block_is_moved_even_without_the_store(
    backend: Backend, tmp_path: Path, publisher: MemoryPublisher
) -> None:
    source, local, quarantine = _blocking_setup(tmp_path)
    for service in _service(backend, local, publisher, DownResults(), quarantine=quarantine):
        handled = service.handle(_blocked(source), may_retry=False)
    assert handled.result.action is not None and handled.result.action.kind == "quarantine_move"
    assert not source.exists()


def test_a_crash_after_the_verdict_was_stored_is_finished_by_the_redelivery(
    backend: Backend, tmp_path: Path, publisher: MemoryPublisher
) -> None:
    source, local, quarantine = _blocking_setup(tmp_path)
    results = MemoryResultStore()
    for service in _service(backend, local, publisher, results, quarantine=quarantine):
        # The first delivery stored its verdict and died before the move.
        assessed = service.pipeline.assess(file_ref(source), "req-c", policy=BLOCK_ALL)
        results.put_if_absent("req-c", assessed.result.model_dump_json())
        assert source.exists()
        handled = service.handle(_blocked(source, "req-c"), may_retry=True)
        again = service.handle(_blocked(source, "req-c"), may_retry=True)
    assert handled.republished and handled.result.action is not None
    assert handled.result.action.kind == "quarantine_move" and not source.exists()
    moved = Path(str(handled.result.action.location))
    assert moved.read_bytes() == noise_jpeg(2)
    assert again.result == handled.result  # the stored record now holds the finished move
