"""One contract for request leases and delivery counts, beside the stored results: the
in-package fake and Redis (the session's own redis-server, on a database of this module's
own) behave the same."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import RedisServer
from worker.cache import MemoryResultStore, RedisResultStore
from worker.cache.leases import LeaseKeeper, MemoryLeases, RedisLeases, Turn
from worker.errors import CacheUnavailable

pytestmark = pytest.mark.integration

_DB = 1  # the session server's database 1 is no test's broker/cache pair (pairs start at 2)

Leases = MemoryLeases | RedisLeases
RESULT = '{"request_id": "r", "status": "ok"}'


def _redis_leases(port: int, prefix: str, count_ttl_s: int = 60) -> RedisLeases:
    return RedisLeases(RedisResultStore(f"redis://127.0.0.1:{port}/{_DB}", prefix, 60), count_ttl_s)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Leases]:
    if request.param == "memory":
        yield MemoryLeases(MemoryResultStore())
        return
    prefix = f"leases-{uuid.uuid4().hex[:8]}"
    leases = _redis_leases(redis_server.port, prefix)
    yield leases
    client = redis.Redis(port=redis_server.port, db=_DB)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()
    leases.results.close()


def test_one_holder_at_a_time_until_it_ends(store: Leases) -> None:
    assert store.start("r", "a", 5) == Turn(None, "a", 0)
    assert store.start("r", "b", 5) == Turn(), "held by another: no lease, no result"
    assert store.start("other", "b", 5) == Turn(None, "b", 0), "leases are per request"
    store.end("r", "b")  # not the holder: the lease stays
    assert store.start("r", "c", 5).token is None
    store.end("r", "a")
    assert store.start("r", "c", 5) == Turn(None, "c", 0)


def test_a_lease_expires_unless_renewed_by_its_holder(store: Leases) -> None:
    assert store.start("r", "a", 0.3).token == "a"
    time.sleep(0.2)
    assert store.renew("r", "a", 0.3)
    assert not store.renew("r", "intruder", 0.3)
    time.sleep(0.2)
    assert store.start("r", "b", 0.3).token is None, "the renewal kept it"
    time.sleep(0.4)
    assert not store.renew("r", "a", 0.3), "expired: the old holder cannot renew"
    assert store.start("r", "b", 0.3) == Turn(None, "b", 1), "a's delivery never ended"


def test_a_count_left_standing_is_what_the_next_holder_sees(store: Leases) -> None:
    for died in range(3):
        turn = store.start("r", f"t{died}", 0.1)
        assert turn == Turn(None, f"t{died}", died)
        assert turn.counted == (died == 0), "start counts a fresh request only"
        if died:
            assert store.begin("r") == died + 1  # it ran alone, and died
        time.sleep(0.15)  # the holder died: its lease runs out, its count stays
    assert store.start("r", "next", 5).standing == 3
    store.end("r", "next")
    assert store.start("r", "after", 5).standing == 0, "a delivery that ended clears the count"


def test_a_delivery_that_dies_before_it_begins_is_not_counted(store: Leases) -> None:
    """A request with a count standing waits to run alone; dying while it waits (another
    request's crash) must not count against it."""
    assert store.start("r", "first", 0.1).counted
    time.sleep(0.15)  # died
    for waited in range(3):
        assert store.start("r", f"waiting-{waited}", 0.1) == Turn(None, f"waiting-{waited}", 1)
        time.sleep(0.15)  # died before it began
    assert store.start("r", "runs", 5).standing == 1
    assert store.begin("r") == 2


def test_a_start_sent_again_answers_what_it_did_the_first_time(store: Leases) -> None:
    """A client re-sends a call whose reply was lost: the same token must find its own lease
    and no count of its own standing, or it would wait out its own lease and then be taken
    for a delivery whose process died."""
    first = store.start("r", "a", 5)
    assert first == Turn(None, "a", 0) and first.counted
    assert store.start("r", "a", 5) == first
    assert store.start("r", "b", 5) == Turn(), "another token still finds it held"
    store.end("r", "a")
    assert store.start("r", "c", 5) == Turn(None, "c", 0), "nothing was left standing"
    store.end("r", "c")
    # A suspect's start counts nothing: sent again, it still sees the deaths before it.
    assert store.start("r", "d", 0.1).counted
    time.sleep(0.15)  # d died
    suspect = store.start("r", "e", 5)
    assert suspect == Turn(None, "e", 1)
    assert store.start("r", "e", 5) == suspect


def test_a_stored_result_is_answered_without_the_lease(store: Leases) -> None:
    store.results.put_if_absent("r", RESULT)
    assert store.start("r", "a", 5) == Turn(RESULT), "a re-delivery takes no lease"
    assert store.start("r", "b", 5) == Turn(RESULT)
    taken = store.start("r", "c", 5, take_over=True)
    assert taken == Turn(RESULT, "c", 0), "nobody held it, and nothing was counted"


def test_a_lease_held_by_another_still_shows_the_stored_result(store: Leases) -> None:
    assert store.start("r", "holder", 5).token == "holder"
    assert store.start("r", "b", 5, take_over=True) == Turn()
    store.results.put_if_absent("r", RESULT)  # the holder stored its result, still holds on
    assert store.start("r", "b", 5) == Turn(RESULT)
    assert store.start("r", "b", 5, take_over=True) == Turn(RESULT), "the lease is the holder's"


def test_taking_over_an_unfinished_action_counts_nothing(store: Leases) -> None:
    assert store.start("r", "dead", 0.1) == Turn(None, "dead", 0)
    store.results.put_if_absent("r", RESULT)  # stored, then its process died before the action
    time.sleep(0.15)
    assert store.start("r", "next", 5) == Turn(RESULT)
    assert store.start("r", "next", 5, take_over=True) == Turn(RESULT, "next", 1)
    store.end("r", "next")
    assert store.start("r", "last", 5, take_over=True) == Turn(RESULT, "last", 0)


def test_racing_takers_get_one_lease(store: Leases) -> None:
    won: list[str] = []
    barrier = threading.Barrier(8)

    def take(token: str) -> None:
        barrier.wait()
        if store.start("race", token, 5).token is not None:
            won.append(token)

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


def test_racing_deliveries_count_one_and_all_find_its_result(store: Leases) -> None:
    """Deliveries come for a request at once: one takes the lease and is counted, stores its
    result and ends; every other finds that result, never a free lease without it."""
    turns: list[Turn] = []
    barrier = threading.Barrier(8)

    def deliver(token: str) -> None:
        barrier.wait()
        while True:
            turn = store.start("race", token, 5)
            if turn.token is not None:
                time.sleep(0.05)  # the work
                store.results.put_if_absent("race", RESULT)
                store.end("race", token)
            if turn.token is not None or turn.stored is not None:
                turns.append(turn)
                return
            time.sleep(0.005)

    threads = [threading.Thread(target=deliver, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(t.stored is None for t in turns) == [False] * 7 + [True]
    [holder] = [t for t in turns if t.token is not None]
    assert holder.standing == 0 and holder.stored is None
    assert store.start("race", "probe", 5, take_over=True).standing == 0, "a count was left"


def test_the_keeper_renews_what_it_holds(store: Leases) -> None:
    keeper = LeaseKeeper(store, 0.3)
    taken = keeper.start("kept")
    assert taken.token is not None
    time.sleep(1.0)  # three lifetimes
    assert store.start("kept", "other", 0.3).token is None, "the keeper let it lapse"
    keeper.release("kept", taken.token)
    assert store.start("kept", "other", 0.3) == Turn(None, "other", 0)
    keeper.close()


def test_an_unreachable_redis_is_cache_unavailable() -> None:
    from tests.support.redis_server import free_port

    results = RedisResultStore(f"redis://127.0.0.1:{free_port()}/0", "p", 60)
    with pytest.raises(CacheUnavailable):
        RedisLeases(results, 60).start("r", "a", 1)
    results.close()


def test_keys_live_under_the_prefix_and_expire(redis_server: RedisServer) -> None:
    prefix = f"leases-{uuid.uuid4().hex[:8]}"
    leases = _redis_leases(redis_server.port, prefix, count_ttl_s=120)
    assert leases.start("r", "a", 30) == Turn(None, "a", 0)
    client = redis.Redis(port=redis_server.port, db=_DB, decode_responses=True)
    keys = sorted(client.scan_iter(f"{prefix}:*"))
    assert keys == [
        f"{prefix}:v1:counted:r",
        f"{prefix}:v1:deliveries:r",
        f"{prefix}:v1:lease:r",
    ]
    assert 0 < client.pttl(f"{prefix}:v1:lease:r") <= 30_000
    assert 0 < client.ttl(f"{prefix}:v1:deliveries:r") <= 120
    assert 0 < client.ttl(f"{prefix}:v1:counted:r") <= 120
    leases.end("r", "a")
    assert list(client.scan_iter(f"{prefix}:*")) == []
    leases.results.put_if_absent("r", RESULT)
    assert leases.start("r", "b", 30) == Turn(RESULT), "the result store's key, beside them"
    assert sorted(client.scan_iter(f"{prefix}:*")) == [f"{prefix}:v1:result:r"]
    client.close()
    leases.results.close()
