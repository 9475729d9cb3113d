"""Overlapping deliveries of one request and requests that kill their worker, with the real
pipeline on the fake model and the in-package fakes (no ONNX Runtime): the lease lets one
delivery work and the others re-publish its result; a delivery count left standing by dead
processes ends in ``too_many_deliveries`` before any work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.support.images import noise_jpeg
from worker.actions import Actions
from worker.cache import MemoryResultStore
from worker.cache.leases import LeaseKeeper, MemoryLeases, Turn
from worker.callbacks import MemoryPublisher
from worker.errors import CacheUnavailable, InvalidRequest, ObjectNotFound, StorageUnavailable
from worker.messages import (
    ActionInfo,
    HashInfo,
    ModerationRequest,
    ModerationResult,
    Status,
    Verdict,
)
from worker.models.backend import Backend
from worker.models.fake import FakeBackend
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.quarantine import LocalQuarantine
from worker.queue.service import DeliveryRules, LeaseBusy, ModerationService, _Turn
from worker.storage import LocalStore, MemoryStore, file_ref

BLOCK_ALL = Policy("block-all", 0.0, 0.0)
ALLOW_ALL = Policy("allow-all", 1.0, 1.0)
HOOK = "redis-stream://results"


class SlowStore(MemoryStore):
    """Counts reads, and how many run at once; each read takes ``delay_s``."""

    def __init__(self, objects: dict[str, bytes], delay_s: float = 0.2) -> None:
        super().__init__(objects)
        self.delay_s = delay_s
        self.reads: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.fail = False
        self._lock = threading.Lock()

    def read(self, ref: str, max_bytes: int) -> bytes:
        with self._lock:
            self.reads.append(ref)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay_s)
            if self.fail:
                raise StorageUnavailable("S3 answered 503")
            return super().read(ref, max_bytes)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture(scope="module")
def backend() -> Backend:
    return FakeBackend()


@contextmanager
def _service(
    backend: Backend,
    store: Any,
    leases: MemoryLeases,
    *,
    ttl_s: float = 5.0,
    rules: DeliveryRules | None = None,
    **pipeline_kw: Any,
) -> Iterator[ModerationService]:
    actions = Actions(quarantine=pipeline_kw.pop("quarantine", None))
    options = PipelineOptions(max_wait_ms=1)
    pipeline = Pipeline(backend, store, ALLOW_ALL, actions=actions, options=options, **pipeline_kw)
    keeper = LeaseKeeper(leases, ttl_s)
    with pipeline:
        yield ModerationService(
            pipeline,
            MemoryPublisher(),
            leases.results,
            {"allow-all": ALLOW_ALL, "block-all": BLOCK_ALL},
            leases=keeper,
            rules=rules or DeliveryRules(lease_poll_s=0.01),
        )
    keeper.close()


def _leases() -> MemoryLeases:
    return MemoryLeases(MemoryResultStore())


def _at_once(works: list[Callable[[], Any]]) -> list[Any]:
    """Run each of ``works`` in a thread of its own, released together; results in order."""
    barrier = threading.Barrier(len(works))
    out: list[Any] = [None] * len(works)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = works[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(works))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return out


def test_deliveries_at_once_fetch_once_and_publish_one_result(backend: Backend) -> None:
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)})
    with _service(backend, store, _leases()) as service:
        request = ModerationRequest(request_id="r1", image="s3://mem/a.jpg", callback=HOOK)
        handled = _at_once([lambda: service.handle(request, may_retry=True)] * 6)
        publisher = service.publisher
    assert all(not isinstance(h, Exception) for h in handled), handled
    assert store.reads == ["s3://mem/a.jpg"], "only the lease holder may fetch"
    results = {h.result.model_dump_json() for h in handled}
    assert len(results) == 1, "every delivery publishes the one stored result"
    assert sum(not h.republished for h in handled) == 1
    assert isinstance(publisher, MemoryPublisher) and len(publisher.published) == 6


def test_deliveries_at_once_move_a_blocked_upload_once(backend: Backend, tmp_path: Path) -> None:
    """The class the lease closes: without it a second delivery reached the source after the
    first had moved it and published ``not_found``."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = uploads / "a.jpg"
    source.write_bytes(noise_jpeg(2))
    local = LocalStore([uploads])
    quarantine = LocalQuarantine(tmp_path / "quarantine", local)
    with _service(backend, local, _leases(), quarantine=quarantine) as service:
        request = ModerationRequest(
            request_id="rb", image=file_ref(source), callback=HOOK, policy="block-all"
        )
        handled = _at_once([lambda: service.handle(request, may_retry=True)] * 5)
    assert all(not isinstance(h, Exception) for h in handled), handled
    assert {h.result.model_dump_json() for h in handled} == {handled[0].result.model_dump_json()}
    result = handled[0].result
    assert result.verdict is Verdict.BLOCK and result.action is not None
    assert result.action.kind == "quarantine_move"
    assert not source.exists()
    copies = [p for p in (tmp_path / "quarantine").iterdir() if p.suffix != ".json"]
    assert len(copies) == 1


def test_a_dead_holders_lease_expires_and_the_next_delivery_takes_over(
    backend: Backend,
) -> None:
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    assert leases.start("r2", "a-dead-worker", 0.5).token  # taken, then never renewed
    with _service(backend, store, leases) as service:
        started = time.monotonic()
        handled = service.handle(
            ModerationRequest(request_id="r2", image="s3://mem/a.jpg"), may_retry=True
        )
        waited = time.monotonic() - started
    assert handled.result.status is Status.OK and not handled.republished
    assert 0.4 < waited < 5, f"waited {waited:.2f} s for a lease of 0.5 s"


def test_a_live_holder_is_waited_for_then_its_result_is_published(backend: Backend) -> None:
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    with _service(backend, store, leases) as service:
        request = ModerationRequest(request_id="r3", image="s3://mem/a.jpg")
        holder = service.leases
        assert holder is not None
        taken = holder.start("r3")  # another delivery in this process holds it
        assert taken.token is not None
        done: list[Any] = []
        waiter = threading.Thread(
            target=lambda: done.append(service.handle(request, may_retry=True))
        )
        waiter.start()
        time.sleep(0.3)
        assert not done and store.reads == [], "the waiter must not work while the lease is held"
        # The holder finishes: stores the result and releases its lease.
        result = service._handle_leased(request, True, _Turn(None, taken.token)).result
        holder.release("r3", taken.token)
        waiter.join(10)
    assert done and done[0].republished and done[0].result == result
    assert store.reads == ["s3://mem/a.jpg"]


def test_a_lease_held_too_long_is_a_retryable_wait(backend: Backend) -> None:
    leases = _leases()
    assert leases.start("r4", "someone-else", 60).token
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    rules = DeliveryRules(lease_wait_s=0.3, lease_poll_s=0.01)
    with _service(backend, store, leases, rules=rules) as service, pytest.raises(LeaseBusy):
        service.handle(ModerationRequest(request_id="r4", image="s3://mem/a.jpg"), may_retry=True)
    assert store.reads == []


def _die_holding(leases: MemoryLeases, request_id: str, times: int) -> None:
    """What a delivery whose process dies leaves behind: a counted delivery, an expired lease."""
    for i in range(times):
        turn = leases.start(request_id, f"dead-{i}", 0.001)
        assert turn.token is not None
        if not turn.counted:
            leases.begin(request_id)  # it ran alone, and died
        time.sleep(0.002)


def test_a_request_that_killed_its_workers_is_answered_before_any_work(
    backend: Backend,
) -> None:
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    _die_holding(leases, "poison", 3)
    with _service(backend, store, leases, rules=DeliveryRules(max_deliveries=3)) as service:
        handled = service.handle(
            ModerationRequest(request_id="poison", image="s3://mem/a.jpg", callback=HOOK),
            may_retry=True,
        )
        again = service.handle(
            ModerationRequest(request_id="poison", image="s3://mem/a.jpg", callback=HOOK),
            may_retry=True,
        )
    assert store.reads == [], "the answer comes before any fetch"
    assert handled.result.error is not None
    assert handled.result.error.code == "too_many_deliveries"
    assert not handled.result.error.retryable
    assert handled.dead_letter == "too_many_deliveries"
    assert again.republished and again.result == handled.result


def test_deliveries_under_the_limit_still_run(backend: Backend) -> None:
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    _die_holding(leases, "twice", 2)
    with _service(backend, store, leases, rules=DeliveryRules(max_deliveries=3)) as service:
        handled = service.handle(
            ModerationRequest(request_id="twice", image="s3://mem/a.jpg"), may_retry=True
        )
    assert handled.result.status is Status.OK
    probe = leases.start("twice", "probe", 1, take_over=True)
    assert probe.standing == 0, "a finished delivery clears the count"


def test_a_retry_is_not_a_death(backend: Backend) -> None:
    """A delivery that ends in a retry ended cleanly: its count is cleared, so transient
    failures never add up to ``too_many_deliveries``."""
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    store.fail = True
    with _service(backend, store, leases, rules=DeliveryRules(max_deliveries=1)) as service:
        request = ModerationRequest(request_id="flaky", image="s3://mem/a.jpg")
        for _ in range(4):
            with pytest.raises(StorageUnavailable):
                service.handle(request, may_retry=True)
        store.fail = False
        handled = service.handle(request, may_retry=True)
    assert handled.result.status is Status.OK
    assert len(store.reads) == 5


def _handler(service: ModerationService, request_id: str, image: str) -> Callable[[], Any]:
    request = ModerationRequest(request_id=request_id, image=image)
    return lambda: service.handle(request, may_retry=True)


def test_suspects_run_one_at_a_time_and_fresh_requests_together(backend: Backend) -> None:
    """A request whose earlier delivery died with its process runs alone, so a crash it
    causes again is not counted against the requests beside it."""
    leases = _leases()
    refs = {f"s3://mem/{i}.jpg": noise_jpeg(10 + i) for i in range(8)}
    store = SlowStore(refs, delay_s=0.2)
    for i in range(4):
        _die_holding(leases, f"suspect-{i}", 1)
    with _service(backend, store, leases) as service:
        suspects = _at_once(
            [_handler(service, f"suspect-{i}", f"s3://mem/{i}.jpg") for i in range(4)]
        )
    assert store.most_at_once == 1, "suspects must not overlap"
    assert all(getattr(h, "result", None) is not None for h in suspects), suspects
    store.most_at_once = 0
    with _service(backend, store, leases) as service:
        fresh = _at_once(
            [_handler(service, f"fresh-{i}", f"s3://mem/{4 + i}.jpg") for i in range(4)]
        )
    assert all(getattr(h, "result", None) is not None for h in fresh), fresh
    assert store.most_at_once > 1, "fresh requests run side by side"


def test_an_error_answered_outside_the_lease_never_replaces_the_holders_verdict(
    backend: Backend, tmp_path: Path
) -> None:
    """An invalid message claiming a request id, or a last-resort answer, publishes its error
    but stores nothing: the real request's stored verdict (here: blocked, its move not yet
    done, its holder dead) still decides what every later delivery answers."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = uploads / "a.jpg"
    source.write_bytes(noise_jpeg(5))
    local = LocalStore([uploads])
    quarantine = LocalQuarantine(tmp_path / "quarantine", local)
    with _service(backend, local, _leases(), quarantine=quarantine) as service:
        request = ModerationRequest(
            request_id="twin", image=file_ref(source), callback=HOOK, policy="block-all"
        )
        assessed = service._assess(request, may_retry=True)
        service._store(assessed.result, may_retry=True)  # the holder stored it and died
        twin = ModerationRequest.model_construct(
            request_id="twin", image="", callback=HOOK, metadata={}
        )
        answered = service.answer(twin, InvalidRequest("invalid request: 1 problem(s)"))
        assert answered.result.error is not None
        handled = service.handle(request, may_retry=True)
    assert handled.result.verdict is Verdict.BLOCK
    assert handled.result.action is not None and handled.result.action.kind == "quarantine_move"
    assert not source.exists()


def test_an_action_that_fails_for_good_is_the_stored_answer(backend: Backend) -> None:
    class Unmovable:
        action = "move"

        def handles(self, ref: str) -> bool:
            return True

        def apply(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
            raise ObjectNotFound("the source is gone")

    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    with _service(backend, store, _leases(), quarantine=Unmovable()) as service:
        request = ModerationRequest(
            request_id="stuck", image="s3://mem/a.jpg", callback=HOOK, policy="block-all"
        )
        first = service.handle(request, may_retry=True)
        again = service.handle(request, may_retry=True)
    assert first.result.error is not None and first.result.error.code == "not_found"
    assert again.republished and again.result == first.result, "a second, different answer"


def test_a_release_that_cannot_reach_redis_is_retried_so_no_death_is_counted() -> None:
    class Flaky(MemoryLeases):
        down = False

        def end(self, request_id: str, token: str) -> None:
            if self.down:
                raise CacheUnavailable("lease store (redis) end failed: timeout")
            super().end(request_id, token)

    store = Flaky(MemoryResultStore())
    keeper = LeaseKeeper(store, 0.3)
    taken = keeper.start("r")  # counted as a delivery that starts work
    assert taken.token is not None
    store.down = True
    keeper.release("r", taken.token)  # a clean end that Redis did not hear of
    store.down = False
    time.sleep(0.5)  # the keeper's thread tries again
    keeper.close()
    assert store.start("r", "next", 1).standing == 0, "a clean end was left counted as a death"


def test_a_holder_whose_lease_was_taken_over_keeps_the_new_holders_count() -> None:
    store = _leases()
    assert store.start("r", "old", 0.05).standing == 0
    time.sleep(0.1)  # the old holder's renewals failed; its lease lapsed
    assert store.start("r", "new", 5).standing == 1
    store.begin("r")
    store.end("r", "old")  # the old one finishes late
    assert store.start("r", "third", 5).token is None, "the new holder's lease was freed"
    store.end("r", "new")
    assert store.start("r", "third", 5).standing == 0


def test_a_stored_result_is_republished_while_another_delivery_holds_the_lease(
    backend: Backend,
) -> None:
    """A re-delivery looks at the stored result before the lease: it never waits for one."""
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    rules = DeliveryRules(lease_wait_s=0.2, lease_poll_s=0.01)
    with _service(backend, store, leases, rules=rules) as service:
        request = ModerationRequest(request_id="r5", image="s3://mem/a.jpg")
        first = service.handle(request, may_retry=True)
        assert leases.start("r5", "a-late-holder", 60, take_over=True).token
        again = service.handle(request, may_retry=True)
    assert again.republished and again.result == first.result
    assert len(store.reads) == 1


def test_with_the_lease_store_unreachable_a_delivery_works_without_a_lease(
    backend: Backend,
) -> None:
    class Unreachable(MemoryLeases):
        def start(
            self, request_id: str, token: str, ttl_s: float, *, take_over: bool = False
        ) -> Turn:
            raise CacheUnavailable("lease store (redis) start failed: timeout")

    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(1)}, delay_s=0)
    with _service(backend, store, Unreachable(MemoryResultStore())) as service:
        request = ModerationRequest(request_id="r6", image="s3://mem/a.jpg")
        first = service.handle(request, may_retry=True)
        again = service.handle(request, may_retry=True)
    assert first.result.status is Status.OK and not first.republished
    assert again.republished and again.result == first.result, "the result store still answers"
    assert len(store.reads) == 1


def test_a_suspect_is_counted_only_once_it_runs_alone(backend: Backend) -> None:
    """Suspects wait their turn holding their leases; counted while waiting, they would all
    be blamed when the one running kills the process."""
    events: list[tuple[str, str]] = []

    class Recording(MemoryLeases):
        def begin(self, request_id: str) -> int:
            events.append(("begin", request_id))
            return super().begin(request_id)

    class Reads(SlowStore):
        def read(self, ref: str, max_bytes: int) -> bytes:
            events.append(("read", ref.rsplit("/", 1)[-1].removesuffix(".jpg")))
            return super().read(ref, max_bytes)

    leases = Recording(MemoryResultStore())
    store = Reads({f"s3://mem/suspect-{i}.jpg": noise_jpeg(20 + i) for i in range(3)}, 0.1)
    for i in range(3):
        _die_holding(leases, f"suspect-{i}", 1)
    events.clear()
    with _service(backend, store, leases) as service:
        _at_once([_handler(service, f"suspect-{i}", f"s3://mem/suspect-{i}.jpg") for i in range(3)])
    assert len(events) == 6
    for begun, read in zip(events[::2], events[1::2], strict=True):
        assert begun[0] == "begin" and read == ("read", begun[1]), events


def test_a_stored_result_this_version_cannot_read_does_not_keep_the_lease(
    backend: Backend, tmp_path: Path
) -> None:
    """A delivery comes to finish an unfinished move; by the take-over the stored result has
    become one it cannot parse (a newer worker replaced it). The delivery fails, and the
    lease it took must not be renewed for ever."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "a.jpg").write_bytes(noise_jpeg(3))
    local = LocalStore([uploads])
    quarantine = LocalQuarantine(tmp_path / "quarantine", local)
    image = file_ref(uploads / "a.jpg")
    unfinished = ModerationResult(
        request_id="garbled",
        image=image,
        status=Status.OK,
        verdict=Verdict.BLOCK,
        hashes=HashInfo(sha256="0" * 64),
        action=ActionInfo(kind="none"),
    ).model_dump_json()

    class Replaced(MemoryResultStore):
        looks = 0

        def get(self, request_id: str) -> str | None:
            self.looks += 1
            return unfinished if self.looks == 1 else '{"request_id": "garbled", "status": "?"}'

    leases = MemoryLeases(Replaced())
    with _service(backend, local, leases, quarantine=quarantine) as service:
        with pytest.raises(ValidationError):
            service.handle(
                ModerationRequest(request_id="garbled", image=image, callback=HOOK),
                may_retry=True,
            )
        assert service.leases is not None and not service.leases._held, "a lease kept"
    assert leases.start("garbled", "next", 5, take_over=True).token == "next"


def test_a_suspect_that_waited_publishes_what_was_stored_while_it_waited(
    backend: Backend,
) -> None:
    """A suspect waits for the one running alone; if its request was answered meanwhile (a
    holder that had lost its lease finished it), that answer is published, not a second run."""
    leases = _leases()
    store = SlowStore({"s3://mem/a.jpg": noise_jpeg(4)}, delay_s=0)
    _die_holding(leases, "late", 1)
    with _service(backend, store, leases) as service:
        finished = service.pipeline.error_result("s3://mem/a.jpg", "late", InvalidRequest("x"))
        request = ModerationRequest(request_id="late", image="s3://mem/a.jpg", callback=HOOK)
        with service._suspects:  # another suspect runs alone
            waiting = threading.Thread(
                target=service.handle, args=(request,), kwargs={"may_retry": True}
            )
            waiting.start()
            time.sleep(0.2)
            leases.results.put_if_absent("late", finished.model_dump_json())
        waiting.join(10)
    assert store.reads == [], "the suspect ran the request again"
