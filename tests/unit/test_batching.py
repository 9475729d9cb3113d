"""The dynamic batcher: flush rules, failure isolation, deadlines, concurrency and draining,
and in front of a model (worker.models.fake: no model file, no ONNX Runtime)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import pytest

from worker.batching import DynamicBatcher
from worker.errors import DeadlineExceeded, InferenceFailed
from worker.models.backend import ModelOutput
from worker.models.fake import FakeBackend, image_with_score

# Generous bounds: these tests check behaviour, not the speed of the machine running them.
SETTLE = 2.0


class Recorder:
    """A run function that records every batch it sees and echoes a tagged result per item."""

    def __init__(self, delay: float = 0.0, poison: object = None) -> None:
        self.batches: list[list[object]] = []
        self.delay = delay
        self.poison = poison
        self._lock = threading.Lock()

    def __call__(self, items: list[object]) -> Sequence[object]:
        with self._lock:
            self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and self.poison in items:
            raise ValueError("poisoned batch")
        return [("out", item) for item in items]

    @property
    def seen(self) -> list[object]:
        return [item for batch in self.batches for item in batch]


def test_batches_never_exceed_max_size() -> None:
    run = Recorder(delay=0.01)
    with DynamicBatcher(run, max_batch_size=4, max_wait_ms=50) as batcher:
        futures = [batcher.submit(i) for i in range(37)]
        results = [f.result(timeout=SETTLE * 5) for f in futures]
    assert results == [("out", i) for i in range(37)]
    sizes = [len(batch) for batch in run.batches]
    assert max(sizes) <= 4
    assert sum(sizes) == 37
    # The queue was full while the first batches ran: batching really happened.
    assert max(sizes) == 4


def test_full_batch_flushes_without_waiting_max_wait() -> None:
    run = Recorder()
    # A max_wait far longer than the test may take: only the size rule can flush.
    batcher: DynamicBatcher[int, object] = DynamicBatcher(run, max_batch_size=4, max_wait_ms=30_000)
    try:
        started = time.monotonic()
        futures = [batcher.submit(i) for i in range(4)]
        results = [f.result(timeout=SETTLE) for f in futures]
        elapsed = time.monotonic() - started
    finally:
        batcher.close()
    assert results == [("out", i) for i in range(4)]
    assert elapsed < SETTLE
    assert [len(b) for b in run.batches] == [4]


def test_single_item_flushes_after_max_wait() -> None:
    run = Recorder()
    max_wait = 0.3
    with DynamicBatcher(run, max_batch_size=64, max_wait_ms=max_wait * 1000) as batcher:
        started = time.monotonic()
        future = batcher.submit("alone")
        result = future.result(timeout=SETTLE)
        elapsed = time.monotonic() - started
    assert result == ("out", "alone")
    assert run.batches == [["alone"]]
    # It waited for company (most of max_wait), then flushed alone well within the bound.
    assert max_wait * 0.8 <= elapsed < SETTLE


def test_output_length_mismatch_fails_items_with_inference_failed() -> None:
    calls: list[int] = []

    def short(items: list[int]) -> list[int]:
        calls.append(len(items))
        return items[:-1]  # one output too few, at any batch size

    with DynamicBatcher(short, max_batch_size=8, max_wait_ms=50) as batcher:
        futures = [batcher.submit(i) for i in range(3)]
        for future in futures:
            with pytest.raises(InferenceFailed) as info:
                future.result(timeout=SETTLE)
            assert info.value.code == "inference_failed"
            assert info.value.retryable


def test_poisoned_item_fails_alone() -> None:
    run = Recorder(poison="poison")
    items = ["a", "b", "poison", "c", "d"]
    with DynamicBatcher(run, max_batch_size=8, max_wait_ms=100) as batcher:
        futures = {item: batcher.submit(item) for item in items}
        outcomes: dict[str, object] = {}
        for item, future in futures.items():
            try:
                outcomes[item] = future.result(timeout=SETTLE)
            except InferenceFailed as exc:
                outcomes[item] = exc
    for item in ("a", "b", "c", "d"):
        assert outcomes[item] == ("out", item)
    failure = outcomes["poison"]
    assert isinstance(failure, InferenceFailed)
    assert isinstance(failure.__cause__, ValueError)
    # The batch containing the poison really was tried whole before being split up.
    assert any(len(batch) > 1 and "poison" in batch for batch in run.batches)


def test_items_past_their_deadline_are_dropped_before_inference() -> None:
    run = Recorder()
    with DynamicBatcher(run, max_batch_size=8, max_wait_ms=50) as batcher:
        expired = batcher.submit("late", deadline=time.monotonic() - 1.0)
        live = batcher.submit("on-time", deadline=time.monotonic() + 60.0)
        free = batcher.submit("no-deadline")
        with pytest.raises(DeadlineExceeded) as info:
            expired.result(timeout=SETTLE)
        assert info.value.code == "deadline_exceeded"
        assert live.result(timeout=SETTLE) == ("out", "on-time")
        assert free.result(timeout=SETTLE) == ("out", "no-deadline")
    assert "late" not in run.seen
    assert sorted(run.seen) == ["no-deadline", "on-time"]


def test_only_expired_batch_never_reaches_the_run_function() -> None:
    run = Recorder()
    with DynamicBatcher(run, max_batch_size=8, max_wait_ms=20) as batcher:
        futures = [batcher.submit(i, deadline=time.monotonic() - 0.5) for i in range(3)]
        for future in futures:
            with pytest.raises(DeadlineExceeded):
                future.result(timeout=SETTLE)
    assert run.batches == []


def test_many_threads_get_their_own_results() -> None:
    run = Recorder()
    threads_count, per_thread = 16, 200 // 16 + 1  # 208 items, at least 200
    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_count)

    with DynamicBatcher(run, max_batch_size=8, max_wait_ms=5) as batcher:

        def worker(thread_index: int) -> None:
            try:
                start.wait()
                mine: list[tuple[tuple[int, int], Future[object]]] = []
                for j in range(per_thread):
                    key = (thread_index, j)
                    mine.append((key, batcher.submit(key)))
                for key, future in mine:
                    value = future.result(timeout=SETTLE * 5)
                    with lock:
                        results[key] = value
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

    assert not errors
    assert len(results) == threads_count * per_thread >= 200
    for key, value in results.items():
        assert value == ("out", key)
    assert all(len(batch) <= 8 for batch in run.batches)
    assert sorted(run.seen) == sorted(results)  # every item ran exactly once


def test_close_drains_queued_items() -> None:
    run = Recorder(delay=0.01)
    # max_wait much longer than the test: close() itself must flush what is queued.
    batcher: DynamicBatcher[int, object] = DynamicBatcher(run, max_batch_size=4, max_wait_ms=30_000)
    futures = [batcher.submit(i) for i in range(10)]
    started = time.monotonic()
    batcher.close()
    assert time.monotonic() - started < SETTLE
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [("out", i) for i in range(10)]
    with pytest.raises(RuntimeError):
        batcher.submit(99)


def test_invalid_batch_size_is_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=0)


def test_a_model_behind_the_batcher_gives_each_image_its_own_score() -> None:
    """Batched forward passes of a model, as the pipeline runs them: every image still gets
    the score of its own pixels, whatever batch it rode in."""
    model = FakeBackend(delay_s=0.01)
    wanted = [0.01 + i * 0.98 / 39 for i in range(40)]
    arrays = [model.preprocess(image_with_score(score)) for score in wanted]

    def run(batch: list[np.ndarray]) -> list[ModelOutput]:
        output = model.forward(np.stack(batch))
        return [model.postprocess(output, i) for i in range(len(batch))]

    with DynamicBatcher(run, max_batch_size=8, max_wait_ms=50) as batcher:
        futures = [batcher.submit(array) for array in arrays]
        scores = [f.result(timeout=SETTLE * 5).scores.nsfw_score for f in futures]
    assert scores == pytest.approx(wanted, abs=0.01)
    assert model.images_scored == 40
    assert max(model.batch_sizes) <= 8
    assert max(model.batch_sizes) > 1  # the queue filled while a batch ran: it batched
