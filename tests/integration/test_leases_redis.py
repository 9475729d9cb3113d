"""One contract for request leases and delivery counts: the in-package fake and Redis (the
session's own redis-server, on a database of this module's own) behave the same."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import RedisServer
from worker.cache.leases import LeaseKeeper, LeaseStore, MemoryLeases, RedisLeases
from worker.errors import CacheUnavailable

pytestmark = pytest.mark.integration

_DB = 1  # the session server's database 1 is no test's broker/cache pair (pairs start at 2)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[LeaseStore]:
    if request.param == "memory":
        yield MemoryLeases()
        return
    prefix = f"leases-{uuid.uuid4().hex[:8]}"
    leases = RedisLeases(f"redis://127.0.0.1:{redis_server.port}/{_DB}", prefix, 60)
    yield leases
    client = redis.Redis(port=redis_server.port, db=_DB)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()
    leases.close()


def test_one_holder_at_a_time_until_it_ends(store: LeaseStore) -> None:
    assert store.acquire("r", "a", 5) == 0
    assert store.acquire("r", "b", 5) is None
    assert store.acquire("other", "b", 5) == 0, "leases are per request"
    store.end("r", "b")  # not the holder: the lease stays
    assert store.acquire("r", "c", 5) is None
    store.end("r", "a")
    assert store.acquire("r", "c", 5) == 0


def test_a_lease_expires_unless_renewed_by_its_holder(store: LeaseStore) -> None:
    assert store.acquire("r", "a", 0.3) == 0
    time.sleep(0.2)
    assert store.renew("r", "a", 0.3)
    assert not store.renew("r", "intruder", 0.3)
    time.sleep(0.2)
    assert store.acquire("r", "b", 0.3) is None, "the renewal kept it"
    time.sleep(0.4)
    assert not store.renew("r", "a", 0.3), "expired: the old holder cannot renew"
    assert store.acquire("r", "b", 0.3) == 0


def test_a_count_left_standing_is_what_the_next_holder_sees(store: LeaseStore) -> None:
    for died in range(3):
        assert store.acquire("r", f"t{died}", 0.1) == died
        assert store.begin("r") == died + 1
        time.sleep(0.15)  # the holder died: its lease runs out, its count stays
    assert store.acquire("r", "next", 5) == 3
    store.end("r", "next")
    assert store.acquire("r", "after", 5) == 0, "a delivery that ended clears the count"


def test_racing_takers_get_one_lease(store: LeaseStore) -> None:
    won: list[str] = []
    barrier = threading.Barrier(8)

    def take(token: str) -> None:
        barrier.wait()
        if store.acquire("race", token, 5) is not None:
            won.append(token)

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


def test_the_keeper_renews_what_it_holds(store: LeaseStore) -> None:
    keeper = LeaseKeeper(store, 0.3)
    taken = keeper.acquire("kept")
    assert taken is not None
    time.sleep(1.0)  # three lifetimes
    assert store.acquire("kept", "other", 0.3) is None, "the keeper let it lapse"
    keeper.release("kept", taken[0])
    assert store.acquire("kept", "other", 0.3) == 0
    keeper.close()


def test_an_unreachable_redis_is_cache_unavailable() -> None:
    from tests.support.redis_server import free_port

    leases = RedisLeases(f"redis://127.0.0.1:{free_port()}/0", "p", 60)
    with pytest.raises(CacheUnavailable):
        leases.acquire("r", "a", 1)
    leases.close()


def test_keys_live_under_the_prefix_and_expire(redis_server: RedisServer) -> None:
    prefix = f"leases-{uuid.uuid4().hex[:8]}"
    leases = RedisLeases(f"redis://127.0.0.1:{redis_server.port}/{_DB}", prefix, 120)
    assert leases.acquire("r", "a", 30) == 0
    leases.begin("r")
    client = redis.Redis(port=redis_server.port, db=_DB, decode_responses=True)
    keys = sorted(client.scan_iter(f"{prefix}:*"))
    assert keys == [f"{prefix}:v1:deliveries:r", f"{prefix}:v1:lease:r"]
    assert 0 < client.pttl(f"{prefix}:v1:lease:r") <= 30_000
    assert 0 < client.ttl(f"{prefix}:v1:deliveries:r") <= 120
    leases.end("r", "a")
    assert list(client.scan_iter(f"{prefix}:*")) == []
    client.close()
    leases.close()
