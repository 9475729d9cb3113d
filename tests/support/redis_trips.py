"""How many times one moderation request goes to Redis, counted deterministically.

``queue_service`` builds the queue worker's service through ``build_runtime`` (the fake
model, images in memory, no quarantine or extras, no callback), wired to a Redis the caller
owns. ``TripCounter`` counts round trips on the client side: every write of a command, a
pipeline or a script call to a socket is one. ``commandstats`` reads what Redis itself ran
(a pipeline's MULTI and EXEC, and the commands inside a script, count one each).
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import redis
from redis.connection import AbstractConnection

from tests.support.images import recompressed
from tests.support.near_duplicates import grey_texture
from worker.messages import ModerationRequest
from worker.models.fake import FakeBackend
from worker.queue.service import ModerationService
from worker.runtime import Runtime, build_runtime
from worker.storage import MemoryStore

__all__ = ["Cases", "TripCounter", "Trips", "commandstats", "measure", "queue_runtime"]


class TripCounter:
    """Counts what every Redis client in this process sends while it is entered."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    @contextmanager
    def counting(self) -> Iterator[TripCounter]:
        send = AbstractConnection.send_packed_command

        def counted(connection: Any, command: Any, check_health: bool = True) -> None:
            with self._lock:
                self.count += 1
            send(connection, command, check_health)

        with mock.patch.object(AbstractConnection, "send_packed_command", counted):
            yield self


def commandstats(client: redis.Redis) -> Counter[str]:
    """Calls of each command Redis has run since its statistics were last reset."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def _jpeg(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class Cases:
    """Images and requests for each case, ``count`` of each."""

    store: MemoryStore
    count: int

    @classmethod
    def build(cls, count: int) -> Cases:
        objects: dict[str, bytes] = {}
        for i in range(count):
            picture = grey_texture(1000 + i)  # the fake model scores grey 0.5: never a block
            objects[f"s3://mem/fresh/{i}"] = _jpeg(picture)
            objects[f"s3://mem/near/{i}"] = _jpeg(recompressed(picture))
        return cls(MemoryStore(objects), count)

    def requests(self, case: str) -> list[ModerationRequest]:
        """``miss``: images never seen; ``exact``: the same bytes under new request ids;
        ``near-miss``: a re-encoded copy of each (a perceptual candidate, not reused: the fake
        model does not block it), ``redelivery``: the first requests again."""
        folder = {"miss": "fresh", "exact": "fresh", "near-miss": "near", "redelivery": "fresh"}
        prefix = "miss" if case == "redelivery" else case
        return [
            ModerationRequest(request_id=f"{prefix}-{i}", image=f"s3://mem/{folder[case]}/{i}")
            for i in range(self.count)
        ]


@contextmanager
def queue_runtime(redis_url: str, store: MemoryStore) -> Iterator[Runtime]:
    """The queue worker's runtime on the fake model, its cache, results and leases in
    ``redis_url``."""
    from worker.config import Settings

    settings = Settings(
        cache_url=redis_url,
        decode_processes=0,
        broker_url=redis_url,
        pending_sweep_s=0,  # no producers' record: the task, not the service, tends it
        lease_ttl_s=600,  # no renewal during a measurement
        max_wait_ms=0,
        metrics_port=0,
    )
    with (
        mock.patch("worker.models.precision.load_model", lambda *a, **k: FakeBackend()),
        build_runtime(
            settings, store=store, quarantine=None, extras=False, send_task=_no_send
        ) as runtime,
    ):
        yield runtime


def _no_send(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("nothing is sent: the requests name no callback")


@dataclass(frozen=True)
class Trips:
    round_trips: float
    commands: float
    by_command: dict[str, float]


def measure(
    service: ModerationService,
    requests: list[ModerationRequest],
    counter: TripCounter,
    client: redis.Redis,
    check: Callable[[Any], None] = lambda handled: None,
) -> Trips:
    """Per request, over ``requests`` handled one after another."""
    trips = 0
    commands: Counter[str] = Counter()
    for request in requests:
        before = commandstats(client)
        start = counter.count
        with counter.counting():
            check(service.handle(request, may_retry=True))
        trips += counter.count - start
        commands.update(commandstats(client) - before)
    commands.pop("info", None)
    n = len(requests)
    return Trips(
        trips / n,
        sum(commands.values()) / n,
        {name: calls / n for name, calls in sorted(commands.items())},
    )
