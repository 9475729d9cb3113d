"""How often one moderation request goes to Redis (tests/support/redis_trips.py counts it),
held at what it is now, so that a change that adds a round trip shows here. Each case runs on
a redis-server of this module's own, so Redis's own statistics are this test's alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from tests.support.redis_server import RedisServer
from tests.support.redis_trips import Cases, TripCounter, measure, queue_runtime
from worker.messages import CacheOutcome
from worker.queue.service import Handled, ModerationService

pytestmark = pytest.mark.integration

#: round trips per request: the one look that takes the lease and counts the delivery, the
#: exact cache tier, the perceptual tier, the cache write, the stored result, the release
MISS = 6
#: the look, the exact cache tier, the stored result, the release
EXACT = 4
#: the look finds the stored result
REDELIVERY = 1
N = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis-trips")) as server:
        yield server


@pytest.fixture(scope="module")
def cases() -> Cases:
    return Cases.build(N + 1)


@pytest.fixture(scope="module")
def service(server: RedisServer, cases: Cases) -> Iterator[ModerationService]:
    with queue_runtime(server.url, cases.store) as runtime:
        assert runtime.service is not None
        yield runtime.service


@pytest.fixture(scope="module")
def client(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port, decode_responses=True)
    yield client
    client.close()


def _check(case: str) -> Callable[[Handled], None]:
    want = CacheOutcome.EXACT if case == "exact" else CacheOutcome.MISS

    def check(handled: Handled) -> None:
        assert handled.result.cache is not None
        assert handled.result.cache.outcome is want, handled.result
        assert handled.republished is (case == "redelivery")

    return check


def test_round_trips_per_request_stay_where_they_are(
    service: ModerationService, cases: Cases, client: redis.Redis
) -> None:
    """In this order: the misses store what the exact hits and the re-deliveries find."""
    counter = TripCounter()
    trips = {}
    for case in ("miss", "near-miss", "exact", "redelivery"):
        requests = cases.requests(case)
        measure(service, requests[-1:], counter, client, _check(case))  # connect, load scripts
        trips[case] = measure(service, requests[:-1], counter, client, _check(case))
    assert trips["miss"].round_trips <= MISS, trips
    assert trips["near-miss"].round_trips <= MISS, trips
    assert trips["exact"].round_trips <= EXACT, trips
    assert trips["redelivery"].round_trips <= REDELIVERY, trips
    near, miss = trips["near-miss"].by_command, trips["miss"].by_command
    assert near["get"] > miss["get"], "the near copies read no perceptual candidate"
