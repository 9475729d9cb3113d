"""Faults injected for real into a running `modq worker`: kill -9, Redis and S3 going away,
crashes at the two dangerous points of a request, SIGTERM under load, a dead webhook.

Each test counts what was sent, what came back and where every upload ended up, and
reports it to the reliability table (docs/reliability.md). Nothing here is mocked: the
worker is a real process on the tests' own redis-server and S3-compatible server.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import Observe
from tests.integration.conftest import WorkerFactory
from tests.integration.faults import (
    QUICK_REDELIVERY,
    S3World,
    gauge,
    send_all,
    tolerant_poll,
    wait_until,
)
from tests.support.faulty_proxy import FaultyProxy
from tests.support.images import distinct_images
from tests.support.ledger import Upload
from tests.support.receivers import SECRET, STREAM, Collector, HttpSide, drain, https_side
from tests.support.redis_server import RedisServer
from tests.support.reliability import scaled
from tests.support.s3_server import S3Server
from worker.queue.sweep import message_task_id

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def crash_launcher(point: str, marker: Path) -> tuple[str, ...]:
    return (
        sys.executable,
        "-m",
        "tests.support.crash_worker",
        "--at",
        point,
        "--marker",
        str(marker),
    )


@pytest.fixture
def http(tmp_path: Path) -> Iterator[HttpSide]:
    with https_side(tmp_path / "tls") as side:
        yield side


@pytest.fixture
def world(tmp_path: Path, s3_moto: S3Server) -> S3World:
    return S3World.create(tmp_path, s3_moto, count=scaled(64, 256), seed=11)


def test_kill_9_with_a_full_batch_in_flight(
    start_worker: WorkerFactory, world: S3World, observe: Observe
) -> None:
    env = {**world.env, **QUICK_REDELIVERY, "MODQ_MAX_BATCH_SIZE": "16", "MODQ_MAX_WAIT_MS": "50"}
    first = start_worker(env)
    collector = Collector(start_worker.broker_url)
    send_all(start_worker.broker_url, world.uploads)
    # A full batch in flight, and some requests already past quarantine and publish. The
    # window lasts a second or two: sample it with cheap reads (the stream's length, the
    # gauge) every 10 ms, not with the collector, whose poll blocks for a while.
    wait_until(
        lambda: collector.redis.xlen(STREAM) > 0 and gauge(first, "modq_in_flight") >= 16,
        timeout=120,
        what="a full batch in flight",
        every=0.01,
    )
    in_flight = int(gauge(first, "modq_in_flight"))
    answered_before = len(collector.results)
    assert first.kill() == -9
    in_both_at_kill = world.in_both_places()

    second = start_worker(env)
    took = world.wait_for_all(
        collector, timeout=180, what="every request answered after the kill", settle=2.0
    )
    tally = world.tally(collector)
    resent = second.log().count("re-sent a request the broker lost")
    observe(
        "fault.kill9",
        f"killed with {in_flight} images in flight and {answered_before} answered; "
        f"{in_both_at_kill} moves cut between copy and delete; the next worker finished "
        f"the rest in {took:.0f} s: {tally.words()}; {resent} popped by the killed worker "
        "but not yet unacked, re-sent from the producers' record",
        **tally.counts(),
    )
    tally.assert_clean()
    assert answered_before < len(world.uploads), "the kill came too late to test anything"
    assert tally.blocked > 0


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to kill: append-only, fsync always, as a broker must be."""
    with RedisServer(tmp_path / "redis", durable=True) as server:
        yield server


def test_redis_killed_and_restarted_mid_run(
    tmp_path: Path, durable_redis: RedisServer, s3_moto: S3Server, world: S3World, observe: Observe
) -> None:
    factory = WorkerFactory(tmp_path, durable_redis, s3_moto, db=0)
    try:
        factory({**world.env, **QUICK_REDELIVERY})
        collector = Collector(factory.broker_url)
        send_all(factory.broker_url, world.uploads)
        wait_until(
            lambda: collector.poll() or len(collector.results) >= len(world.uploads) // 5,
            timeout=120,
            what="a fifth of the results",
        )
        answered_before = len(collector.results)
        durable_redis.stop()  # SIGKILL: broker, cache and result store gone at once
        time.sleep(3.0)
        durable_redis.start()
        took = wait_until(
            lambda: tolerant_poll(collector) or len(collector.results) == len(world.uploads),
            timeout=180,
            what="every request answered after the Redis restart",
        )
        time.sleep(2.0)
        tally = world.tally(collector)
        worker = factory.started[0]
        assert worker.running, "the worker died with its Redis"
        reconnected = "Connection to broker lost" in worker.log()
    finally:
        for worker in factory.started:
            worker.stop()
    observe(
        "fault.redis_restart",
        f"Redis killed (SIGKILL) after {answered_before} results, back 3 s later; the same "
        f"worker reconnected and answered the rest in {took:.0f} s: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert reconnected


def test_with_the_cache_redis_gone_the_worker_keeps_classifying(
    tmp_path: Path, start_worker: WorkerFactory, world: S3World, observe: Observe
) -> None:
    with RedisServer(tmp_path / "cache-redis") as cache:
        worker = start_worker({**world.env, "MODQ_CACHE_URL": cache.url})
        collector = Collector(start_worker.broker_url)
        half = len(world.uploads) // 2
        send_all(start_worker.broker_url, world.uploads[:half])
        wait_until(
            lambda: collector.poll() or len(collector.results) == half, 120, "the first half"
        )
        cache.stop()  # for good: the rest runs without a cache
        send_all(start_worker.broker_url, world.uploads[half:])
        took = wait_until(
            lambda: collector.poll() or len(collector.results) == len(world.uploads),
            timeout=120,
            what="the second half without a cache",
        )
        tally = world.tally(collector)
        after = [collector.results[u.request_id][0] for u in world.uploads[half:]]
        misses = sum(1 for r in after if r.cache is not None and r.cache.outcome.value == "miss")
    observe(
        "fault.cache_db_gone",
        f"cache Redis killed after {half} results and not restarted; the next "
        f"{len(after)} were classified in {took:.1f} s, {misses} as cache misses: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert misses == len(after)
    assert "cache unavailable" in worker.log()


@pytest.fixture
def proxy(s3_moto: S3Server) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy((s3_moto.host, s3_moto.port))
    proxy.set_state("up")
    yield proxy
    proxy.close()


def test_s3_stopped_then_failing_then_back(
    start_worker: WorkerFactory, world: S3World, proxy: FaultyProxy, observe: Observe
) -> None:
    worker = start_worker({**world.env, "MODQ_S3_ENDPOINT_URL": proxy.url})
    collector = Collector(start_worker.broker_url)
    proxy.set_state("down")
    send_all(start_worker.broker_url, world.uploads)
    time.sleep(3.0)
    proxy.set_state("failing")
    time.sleep(3.0)
    proxy.set_state("up")
    took = world.wait_for_all(
        collector, timeout=180, what="every request answered after the outage", settle=1.0
    )
    tally = world.tally(collector)
    retries = gauge(worker, 'modq_retries_total{code="storage_unavailable"}')
    observe(
        "fault.s3_outage",
        f"S3 refused connections for 3 s, then answered {proxy.failed_requests} requests "
        f"503 SlowDown for 3 s; {retries:.0f} task retries; all answered {took:.0f} s after "
        f"the outage began: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert proxy.failed_requests > 0 and retries > 0
    assert tally.blocked > 0


def test_crash_between_quarantine_copy_and_delete(
    tmp_path: Path, start_worker: WorkerFactory, s3_moto: S3Server, observe: Observe
) -> None:
    world = S3World.create(tmp_path, s3_moto, count=8, seed=12)
    env = {**world.env, **QUICK_REDELIVERY}
    marker = tmp_path / "crashed"
    launcher = crash_launcher("quarantine-delete", marker)
    crashing = start_worker(env, launcher=launcher)
    collector = Collector(start_worker.broker_url)
    send_all(start_worker.broker_url, world.uploads)
    assert crashing.wait(timeout=120) == -9, "the worker did not reach the crash point"
    # At the crash: a verified copy in quarantine and the source still in place.
    in_both_at_crash = world.in_both_places()
    collector.poll()
    answered_before = len(collector.results)

    start_worker(env, launcher=launcher)  # the marker is there: this one runs normally
    took = world.wait_for_all(
        collector, timeout=120, what="every request answered after the crash", settle=1.0
    )
    tally = world.tally(collector)
    observe(
        "fault.crash_quarantine",
        f"SIGKILL inside the move, after copy + verify + record and before the delete: "
        f"{in_both_at_crash} upload(s) then in both places, none in neither; the redelivery "
        f"finished in {took:.0f} s: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert in_both_at_crash >= 1
    assert answered_before < len(world.uploads)
    assert tally.blocked > 0


def test_crash_between_publish_and_ack(
    tmp_path: Path, start_worker: WorkerFactory, s3_moto: S3Server, observe: Observe
) -> None:
    world = S3World.create(tmp_path, s3_moto, count=8, seed=13)
    env = {**world.env, **QUICK_REDELIVERY, "MODQ_MAX_BATCH_SIZE": "1", "MODQ_CONCURRENCY": "1"}
    marker = tmp_path / "crashed"
    launcher = crash_launcher("publish-ack", marker)
    crashing = start_worker(env, launcher=launcher)
    collector = Collector(start_worker.broker_url)
    send_all(start_worker.broker_url, world.uploads)
    assert crashing.wait(timeout=120) == -9, "the worker did not reach the crash point"
    collector.poll()
    [(crashed_id, [published])] = list(collector.results.items())

    survivor = start_worker(env, launcher=launcher)
    # The unacked message comes back after the visibility timeout: a second copy then.
    took = wait_until(
        lambda: (
            collector.poll()
            or (
                len(collector.results) == len(world.uploads)
                and len(collector.results[crashed_id]) > 1
            )
        ),
        timeout=120,
        what="every request answered and the crashed one re-published",
    )
    time.sleep(1.0)
    tally = world.tally(collector)
    copies = collector.results[crashed_id]
    republished = survivor.log().count("re-delivery: publishing the stored result")
    observe(
        "fault.crash_publish_ack",
        f"SIGKILL after publishing {crashed_id}, before its ack; the redelivery re-published "
        f"the stored result ({len(copies)} identical copies, {republished} re-publication "
        f"logged, nothing re-run) and the rest finished in {took:.0f} s: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert len(copies) == 2 and copies[1] == published
    assert republished == 1 and tally.duplicates == 1


def test_crash_between_the_brokers_pop_and_the_unacked_record(
    tmp_path: Path, start_worker: WorkerFactory, s3_moto: S3Server, observe: Observe
) -> None:
    """The Redis transport's own gap (celery/kombu#305): the message has left the queue
    list and is not yet in the unacked hash. No broker redelivery can bring it back; the
    producers' record of pending requests does."""
    world = S3World.create(tmp_path, s3_moto, count=8, seed=14)
    env = {**world.env, **QUICK_REDELIVERY}
    marker = tmp_path / "crashed"
    launcher = crash_launcher("deliver", marker)
    crashing = start_worker(env, launcher=launcher)
    collector = Collector(start_worker.broker_url)
    send_all(start_worker.broker_url, world.uploads)
    assert crashing.wait(timeout=120) == -9, "the worker did not reach the crash point"
    # At the crash: one request is neither queued nor unacked, the broker has forgotten it.
    broker = redis.Redis.from_url(start_worker.broker_url, decode_responses=True)
    held = {message_task_id(raw) for raw in broker.lrange("modq", 0, -1)}
    held |= {message_task_id(raw) for raw in broker.hvals("unacked")}
    gone = sorted({u.request_id for u in world.uploads} - held)
    broker.close()

    survivor = start_worker(env, launcher=launcher)  # the marker is there: a normal worker
    took = world.wait_for_all(
        collector, timeout=120, what="every request answered after the crash", settle=1.0
    )
    tally = world.tally(collector)
    resent = survivor.log().count("re-sent a request the broker lost")
    observe(
        "fault.lost_in_transport",
        f"SIGKILL after BRPOP, before the unacked record: {len(gone)} request(s) then in "
        f"neither the queue nor the unacked hash; {resent} re-sent by the next worker's "
        f"sweep from the producers' record, all answered in {took:.0f} s: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert len(gone) == 1, gone
    assert resent == 1
    [line] = [x for x in survivor.log().splitlines() if "re-sent a request the broker lost" in x]
    assert json.loads(line)["request_id"] == gone[0]


def test_sigterm_during_load(
    tmp_path: Path, start_worker: WorkerFactory, s3_moto: S3Server, observe: Observe
) -> None:
    world = S3World.create(tmp_path, s3_moto, count=scaled(128, 512), seed=14)
    # The default visibility timeout (an hour): what the next worker gets quickly must have
    # been handed back by the stopping one, not recovered by timeout.
    first = start_worker(world.env)
    collector = Collector(start_worker.broker_url)
    send_all(start_worker.broker_url, world.uploads)
    wait_until(
        lambda: collector.poll() or len(collector.results) >= len(world.uploads) // 10,
        timeout=120,
        what="a tenth of the results",
    )
    held = int(gauge(first, "modq_in_flight"))
    stopping = time.monotonic()
    code = first.stop(timeout=60)
    stop_s = time.monotonic() - stopping
    collector.poll()
    answered_by_first = len(collector.results)
    broker = redis.Redis.from_url(start_worker.broker_url)
    queued, unacked = broker.llen("modq"), broker.hlen("unacked")
    broker.close()

    start_worker(world.env)
    took = world.wait_for_all(
        collector, timeout=180, what="the rest answered by the next worker", settle=1.0
    )
    tally = world.tally(collector)
    observe(
        "fault.sigterm",
        f"SIGTERM with {held} images in flight: exit code {code} after {stop_s:.1f} s, "
        f"{answered_by_first} answered by then, {queued} back on the queue and {unacked} "
        f"left unacked; the next worker answered the rest in {took:.0f} s: {tally.words()}",
        **tally.counts(),
    )
    tally.assert_clean()
    assert code == 0
    assert unacked == 0 and queued == len(world.uploads) - answered_by_first
    assert tally.duplicates == 0


def test_webhook_down_retries_then_dead_letters(
    tmp_path: Path, start_worker: WorkerFactory, http: HttpSide, observe: Observe
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    uploads = []
    for i, data in enumerate(distinct_images(3, seed=15)):
        (images / f"{i}.jpg").write_bytes(data)
        uploads.append(Upload(f"hook-{i}", (images / f"{i}.jpg").as_uri(), data))
    http.post_failures = 10**6  # down for good
    webhook_retries, max_retries = 1, 3
    start_worker(
        {
            "MODQ_ALLOWED_ROOTS": str(images),
            "MODQ_WEBHOOK_SECRET": SECRET,
            "MODQ_WEBHOOK_RETRIES": str(webhook_retries),
            "MODQ_MAX_RETRIES": str(max_retries),
            "MODQ_HTTP_ALLOWED_NETWORKS": "127.0.0.1/32",
            "SSL_CERT_FILE": str(http.ca),
        }
    )
    send_all(start_worker.broker_url, uploads, callback=f"{http.url}/hook")
    dead: list[Any] = []
    wait_until(
        lambda: dead.extend(drain(start_worker.broker_url, "modq.dead")) or len(dead) == 3,
        timeout=120,
        what="three dead letters",
        every=0.5,
    )
    attempts = (max_retries + 1) * (webhook_retries + 1)
    kept = {d[0][0]["request"]["request_id"]: d[0][0] for d in dead}
    gaps = _task_attempt_gaps(http.post_times, webhook_retries + 1, len(uploads))
    observe(
        "fault.webhook_down",
        f"endpoint answered 503 to all {len(http.post_times)} POSTs "
        f"({attempts} per result: {max_retries + 1} task attempts x {webhook_retries + 1} "
        f"tries); waits between task attempts {', '.join(f'{g:.1f}' for g in gaps)} s; "
        f"then {len(kept)} results kept in `modq.dead` (reason "
        f"{', '.join(sorted({k['reason'] for k in kept.values()}))}), none dropped",
        sent=len(uploads),
        received=len(kept),
        lost=len(uploads) - len(kept),
        duplicates=len(dead) - len(kept),
    )
    assert sorted(kept) == sorted(u.request_id for u in uploads)
    assert all(k["reason"] == "callback_failed" for k in kept.values())
    assert all(k["result"]["status"] == "ok" and k["result"]["verdict"] for k in kept.values())
    assert len(http.post_times) == attempts * len(uploads)


def _task_attempt_gaps(times: list[float], per_attempt: int, requests: int) -> list[float]:
    """Mean wait between consecutive task attempts, first to last (the backoff)."""
    ordered = sorted(times)
    attempts = len(ordered) // (per_attempt * requests)
    starts = [ordered[i * per_attempt * requests] for i in range(attempts)]
    return [b - a for a, b in itertools.pairwise(starts)]
