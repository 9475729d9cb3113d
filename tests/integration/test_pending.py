"""The record of requests in flight on a Redis broker, and the sweeper that re-sends the ones
the transport lost, against the tests' own redis-server and the real kombu transport.

The loss is made as the transport makes it: the message is popped from the queue list (what
``BRPOP`` does) and never written to the unacked hash (what a worker killed in between never
gets to do). Unacked messages are taken with kombu's own ``basic_get``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from tests.integration.conftest import WorkerFactory
from tests.integration.faults import wait_until
from tests.support.redis_server import RedisServer
from worker.config import Settings
from worker.queue.client import Client
from worker.queue.sweep import PendingRequests, Sweeper, message_task_id, resend_options

pytestmark = pytest.mark.integration

QUEUE = "modq"


@pytest.fixture
def settings(redis_server: RedisServer, db_pair: int) -> Settings:
    return Settings(broker_url=f"redis://127.0.0.1:{redis_server.port}/{db_pair}", queue=QUEUE)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as client:
        yield client


@pytest.fixture
def pending(client: Client) -> PendingRequests:
    assert client.pending is not None
    return client.pending


@pytest.fixture
def raw(settings: Settings) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    yield connection
    connection.close()


class Resends:
    """The sweeper's re-send, through the real producer, counted."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sent: list[str] = []

    def __call__(self, request_id: str, message: dict[str, Any], options: dict[str, Any]) -> None:
        self.sent.append(request_id)
        self.client.app.send_task(
            "modq.moderate",
            args=[message],
            queue=QUEUE,
            task_id=request_id,
            **resend_options(options),
        )


def sweeper(pending: PendingRequests, client: Client) -> tuple[Sweeper, Resends]:
    resends = Resends(client)
    return Sweeper(pending, resends, interval_s=1.0), resends


def take(client: Client, pending: PendingRequests) -> str:
    """A worker's whole turn on the next message: delivered (unacked), answered, forgotten,
    acked; returns its id."""
    with client.app.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.basic_get(QUEUE, no_ack=False)
        assert message is not None
        request_id = str(message.headers["id"])
        pending.forget(request_id)
        channel.basic_ack(message.delivery_tag)
    return request_id


def submit(client: Client, request_id: str) -> None:
    client.submit(
        f"s3://uploads/{request_id}.jpg", request_id=request_id, callback="redis-stream://r"
    )


def queued_ids(raw: redis.Redis) -> list[str]:
    """Task ids in the queue, oldest (next to be popped) first."""
    return [str(message_task_id(item)) for item in reversed(raw.lrange(QUEUE, 0, -1))]


def lose_next(raw: redis.Redis) -> str:
    """Pop the oldest message as BRPOP does, and drop it: the transport's gap."""
    item = raw.rpop(QUEUE)
    assert item is not None
    return str(message_task_id(item))


def test_requests_are_recorded_before_they_are_queued_and_forgotten_after(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    submit(client, "a")
    submit(client, "b")
    assert queued_ids(raw) == ["a", "b"]
    assert pending.count() == 2
    message = {"request_id": "a", "image": "s3://uploads/a.jpg", "callback": "redis-stream://r"}
    assert pending.entry("a") == (message, {})
    first, second = (raw.zscore(pending.key, rid) for rid in ("a", "b"))
    assert first is not None and second is not None and first < second
    renewed = pending.renew("a")
    assert renewed is not None and renewed > second
    assert pending.renew("never-sent") is None
    pending.forget("a")
    pending.forget("b")
    assert pending.count() == 0
    assert not raw.exists(pending.key, pending.messages_key)


def test_a_message_lost_between_pop_and_unacked_is_re_sent_after_two_sweeps(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    for rid in ("lost", "waiting-1", "waiting-2"):
        submit(client, rid)
    assert lose_next(raw) == "lost"
    assert queued_ids(raw) == ["waiting-1", "waiting-2"]
    sweep, resends = sweeper(pending, client)

    first = sweep.sweep()
    assert (first.checked, first.suspects, first.resent) == (1, 1, [])
    assert take(client, pending) == "waiting-1"  # the queue moves on
    second = sweep.sweep()
    assert second.resent == ["lost"] and resends.sent == ["lost"]

    # The same request is back, behind the others, with its recorded message.
    assert queued_ids(raw) == ["waiting-2", "lost"]
    body = json.loads(raw.lindex(QUEUE, 0) or "{}")
    assert body["headers"]["id"] == "lost" and body["headers"]["task"] == "modq.moderate"
    # Renewed: queued again, it is no longer a candidate, however often the sweep runs.
    assert [sweep.sweep().resent for _ in range(3)] == [[], [], []]
    assert resends.sent == ["lost"]


def test_while_the_queue_does_not_move_nothing_is_re_sent(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    """Every worker busy: a suspect may be waiting beyond the window, so the sweep waits."""
    for rid in ("lost", "waiting"):
        submit(client, rid)
    lose_next(raw)
    sweep, resends = sweeper(pending, client)
    reports = [sweep.sweep() for _ in range(4)]
    assert [r.suspects for r in reports] == [1, 1, 1, 1]
    assert resends.sent == []
    take(client, pending)  # the queue empties
    assert sweep.sweep().resent == ["lost"]


def test_an_empty_queue_counts_as_moving(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    submit(client, "lost")
    lose_next(raw)
    sweep, resends = sweeper(pending, client)
    assert [sweep.sweep().resent for _ in range(2)] == [[], ["lost"]]
    assert resends.sent == ["lost"]


def test_requests_still_queued_are_never_re_sent(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    for i in range(20):
        submit(client, f"q{i}")
    sweep, resends = sweeper(pending, client)
    reports = [sweep.sweep() for _ in range(3)]
    assert [r.checked for r in reports] == [0, 0, 0]
    assert resends.sent == [] and len(queued_ids(raw)) == 20


def test_unacked_messages_are_not_taken_for_lost(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    for rid in ("held", "later"):
        submit(client, rid)
    with client.app.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.basic_get(QUEUE, no_ack=False)  # kombu records it as unacked
        assert message is not None and message.headers["id"] == "held"
        assert "held" in pending.unacked_ids()
        sweep, resends = sweeper(pending, client)
        reports = [sweep.sweep() for _ in range(3)]
        assert [r.checked for r in reports] == [1, 1, 1]
        assert resends.sent == []
        channel.basic_ack(message.delivery_tag)


def test_messages_a_warm_shutdown_put_back_newest_first_are_not_taken_for_lost(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    """kombu restores a stopping worker's prefetched messages in delivery order, each to the
    tail: the newest then comes out first and the older ones wait behind it."""
    for i in range(6):
        submit(client, f"p{i}")
    with client.app.connection_for_read() as connection:
        channel = connection.default_channel
        for _ in range(6):
            assert channel.basic_get(QUEUE, no_ack=False) is not None
        assert raw.llen(QUEUE) == 0
        channel.qos.restore_unacked()  # what a warm shutdown runs
    assert queued_ids(raw) == ["p5", "p4", "p3", "p2", "p1", "p0"]
    sweep, resends = sweeper(pending, client)
    reports = [sweep.sweep()]
    for _ in range(3):
        take(client, pending)  # the queue moves: p5, p4, p3 answered
        reports.append(sweep.sweep())
    assert [r.checked for r in reports] == [0, 0, 0, 0]
    assert resends.sent == []


def test_a_re_send_keeps_the_priority_and_expiry_it_was_sent_with(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    request = client.request("s3://uploads/e.jpg", request_id="kept")
    client.send(request, expires=expires, priority=0)
    entry = pending.entry("kept")
    assert entry is not None and entry[1] == {"expires": expires.isoformat(), "priority": 0}
    lose_next(raw)
    sweep, _ = sweeper(pending, client)
    assert [sweep.sweep().resent for _ in range(2)] == [[], ["kept"]]
    body = json.loads(raw.lindex(QUEUE, 0) or "{}")
    assert datetime.fromisoformat(body["headers"]["expires"]) == expires


def test_a_request_that_could_not_be_sent_is_not_re_sent_later(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    request = client.request("s3://uploads/x.jpg", request_id="refused")
    with pytest.raises(TypeError):
        client.send(request, countdown="not a number")  # Celery refuses it
    assert pending.entry("refused") is None and raw.llen(QUEUE) == 0


def test_a_retry_renewed_before_it_is_queued_is_not_taken_for_lost(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    """A retry is a new message at the back of the queue; the task renews the record first,
    so the retry sorts after the backlog it waits behind."""
    submit(client, "retried")
    lose_next(raw)  # a worker took it (and acked it when it scheduled the retry)
    for i in range(5):
        submit(client, f"backlog-{i}")
    pending.renew("retried")
    entry = pending.entry("retried")
    assert entry is not None
    Resends(client)("retried", *entry)
    sweep, resends = sweeper(pending, client)
    assert [sweep.sweep().checked for _ in range(3)] == [0, 0, 0]
    assert resends.sent == []


def test_one_worker_sweeps_at_a_time(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    submit(client, "lost")
    lose_next(raw)
    one, one_sent = sweeper(pending, client)
    other, other_sent = sweeper(pending, client)
    assert one.sweep().skipped is None
    assert other.sweep().skipped == "another worker sweeps"
    assert one.sweep().resent == ["lost"]  # the queue is empty: it moves
    one.stop()  # gives the lock up
    assert other.sweep().skipped is None
    assert one_sent.sent == ["lost"] and other_sent.sent == []


def test_a_queue_whose_oldest_messages_are_not_recorded_is_left_alone(
    client: Client, pending: PendingRequests, raw: redis.Redis
) -> None:
    submit(client, "lost")
    lose_next(raw)
    # Another producer, one that keeps no record, sends straight through Celery.
    client.app.send_task(
        "modq.moderate",
        args=[{"request_id": "x", "image": "s3://b/x"}],
        queue=QUEUE,
        task_id="foreign",
    )
    sweep, resends = sweeper(pending, client)
    assert [sweep.sweep().skipped for _ in range(2)] == [
        "the next queued messages are not recorded"
    ] * 2
    assert resends.sent == []


def test_another_broker_or_the_sweep_turned_off_records_nothing() -> None:
    assert PendingRequests.from_settings(Settings(broker_url="amqp://guest@localhost//")) is None
    assert PendingRequests.from_settings(Settings(pending_sweep_s=0)) is None


def test_an_expired_request_is_forgotten_by_the_worker_not_re_sent(
    start_worker: WorkerFactory,
) -> None:
    """Celery acks an expired (or revoked) request without running it; the worker forgets
    it then, or every sweep would send it again."""
    worker = start_worker({"MODQ_PENDING_SWEEP_S": "1"})
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        assert client.pending is not None
        past = datetime.now(UTC) - timedelta(seconds=5)
        client.send(client.request("file:///gone.jpg", request_id="expired"), expires=past)
        pending = client.pending
        wait_until(
            lambda: pending.entry("expired") is None, timeout=60, what="the record forgotten"
        )
        time.sleep(3.0)  # three sweeps
        assert pending.count() == 0
    log = worker.log()
    assert "expired" in log and "re-sent a request the broker lost" not in log


def test_a_retry_is_renewed_in_the_record_before_it_is_queued(
    start_worker: WorkerFactory,
) -> None:
    """The worker's own retry path: S3 refuses connections, the task retries, and the record
    carries a newer sequence number than the request was sent with."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start_worker(
        {
            "MODQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "MODQ_ALLOWED_BUCKETS": "uploads",
            "MODQ_PENDING_SWEEP_S": "1",
        }
    )
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        assert client.pending is not None
        pending = client.pending
        client.submit("s3://uploads/a.jpg", request_id="retried")
        sent = pending.client.zscore(pending.key, "retried")
        assert sent is not None
        wait_until(
            lambda: (pending.client.zscore(pending.key, "retried") or 0) > sent,
            timeout=60,
            what="the record renewed by a retry",
        )
