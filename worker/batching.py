"""The dynamic batcher: many caller threads submit one item each; one thread runs batches.

A batch is flushed when it holds ``max_batch_size`` items or when its oldest item has waited
``max_wait_ms``. Items past their deadline are dropped before inference. If a batch fails,
its items are re-run one by one, so a bad item fails alone and never takes the batch with it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from worker import metrics
from worker.errors import DeadlineExceeded, InferenceFailed, ModqError

__all__ = ["DynamicBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float | None = None


_STOP = object()


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        max_batch_size: int = 32,
        max_wait_ms: float = 10.0,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.SimpleQueue[_Pending[T, R] | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, item: T, deadline: float | None = None) -> Future[R]:
        """Queue ``item``; ``deadline`` is a ``time.monotonic()`` instant after which it is
        dropped with ``DeadlineExceeded`` instead of run."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future[R] = Future()
        self._queue.put(_Pending(item, future, deadline=deadline))
        return future

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> DynamicBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._collect(first)  # type: ignore[arg-type]
            self._run(batch)

    def _collect(self, first: _Pending[T, R]) -> tuple[list[_Pending[T, R]], bool]:
        batch = [first]
        flush_at = first.enqueued + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = flush_at - time.monotonic()
            try:
                nxt = (
                    self._queue.get_nowait()
                    if remaining <= 0
                    else self._queue.get(timeout=remaining)
                )
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)  # type: ignore[arg-type]
        return batch, False

    def _run(self, batch: list[_Pending[T, R]]) -> None:
        now = time.monotonic()
        live: list[_Pending[T, R]] = []
        for pending in batch:
            if pending.deadline is not None and pending.deadline < now:
                pending.future.set_exception(DeadlineExceeded("dropped: past its deadline"))
            elif pending.future.set_running_or_notify_cancel():
                live.append(pending)
                metrics.QUEUE_WAIT_SECONDS.observe(now - pending.enqueued)
        if not live:
            return
        metrics.BATCH_SIZE.observe(len(live))
        started = time.perf_counter()
        try:
            results = self._run_batch([p.item for p in live])
            if len(results) != len(live):
                raise InferenceFailed(f"batch of {len(live)} returned {len(results)} outputs")
        except Exception as exc:
            if len(live) == 1:
                _fail(live[0], exc)
            else:
                # Isolate the failure: run each item alone, so only the bad one fails.
                for pending in live:
                    self._run_one(pending)
            return
        finally:
            metrics.FORWARD_SECONDS.observe(time.perf_counter() - started)
        for pending, result in zip(live, results, strict=True):
            pending.future.set_result(result)

    def _run_one(self, pending: _Pending[T, R]) -> None:
        try:
            results = self._run_batch([pending.item])
            if len(results) != 1:
                raise InferenceFailed(f"one input returned {len(results)} outputs")
            pending.future.set_result(results[0])
        except Exception as exc:
            _fail(pending, exc)


def _fail(pending: _Pending[Any, Any], exc: Exception) -> None:
    if isinstance(exc, ModqError):
        pending.future.set_exception(exc)
        return
    failure = InferenceFailed(f"inference failed: {exc!r}")
    failure.__cause__ = exc
    pending.future.set_exception(failure)
