"""What a real `modq worker` does with messages that are not its own, and with results that
have nowhere to go: unknown task names and header-less messages on modq's queue are
dead-lettered (never dropped), a `celery://task` callback without `?queue` reaches Celery's
default queue, one that cannot be routed is not counted as published, and the metrics count
what was handed to a broker."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from tests.integration.conftest import WorkerFactory
from tests.support.images import distinct_images
from tests.support.receivers import SECRET, STREAM, Collector, drain, drain_with_headers, https_side
from worker.config import Settings
from worker.messages import ModerationResult, Status
from worker.queue.app import create_app
from worker.queue.client import Client

pytestmark = pytest.mark.integration

CALLBACK = f"redis-stream://{STREAM}"


def _dead_letters(broker_url: str, want: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(letters) < want and time.monotonic() < deadline:
        letters += [body[0][0] for body in drain(broker_url, "modq.dead")]
        time.sleep(0.2)
    assert len(letters) >= want, f"only {len(letters)} of {want} dead letters: {letters}"
    return letters


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name:
            found = ",".join(sorted((match[2] or "").split(","))) if match[2] else ""
            if found == want:
                return float(match[3])
    return 0.0


def _images(tmp_path: Path, seed: int) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(distinct_images(1, seed=seed)[0])
    return images


def test_unknown_tasks_and_headerless_messages_are_dead_lettered_not_dropped(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    images = _images(tmp_path, 41)
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    app = create_app(Settings(broker_url=broker))
    request = {"request_id": "misspelt", "image": (images / "ok.jpg").as_uri()}
    app.send_task("modq.moderat", args=[request], queue="modq", task_id="misspelt-task")
    with Connection(broker) as connection:  # no Celery headers at all: a bare JSON body
        connection.Producer().publish(
            {"hello": "modq"}, exchange="", routing_key="modq", serializer="json"
        )
    collector = Collector(broker)
    with Client(Settings(broker_url=broker)) as client:  # the worker goes on working
        client.submit((images / "ok.jpg").as_uri(), request_id="after", callback=CALLBACK)
    collector.wait_for(1, timeout=90)
    collector.close()

    letters = {letter["reason"]: letter for letter in _dead_letters(broker, 2)}
    assert set(letters) == {"unknown_task", "unknown_message"}
    unknown = letters["unknown_task"]
    assert unknown["request"] == [[request], {}, {"callbacks": None, "errbacks": None,
                                                   "chain": None, "chord": None}]  # fmt: skip
    assert unknown["message"]["headers"]["task"] == "modq.moderat"
    assert unknown["message"]["headers"]["id"] == "misspelt-task"
    assert unknown["message"]["delivery_info"]["routing_key"] == "modq"
    assert unknown["result"] is None
    bare = letters["unknown_message"]
    assert bare["request"] == {"hello": "modq"}
    assert json.loads(bare["message"]["body"]) == {"hello": "modq"}
    client = redis.Redis.from_url(broker)
    assert client.llen("modq") == 0
    deadline = time.monotonic() + 30  # "after" is acked just after its result went out
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.hlen("unacked") == 0, "a dead-lettered message was left unacked"
    text = worker.metrics()
    assert _metric(text, "modq_dead_letters_total", reason="unknown_task") == 1.0
    assert _metric(text, "modq_dead_letters_total", reason="unknown_message") == 1.0


def test_celery_callbacks_go_to_celerys_default_queue_and_only_delivered_results_count(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    images = _images(tmp_path, 42)
    ok = (images / "ok.jpg").as_uri()
    missing = (images / "missing.jpg").as_uri()
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    with Client(Settings(broker_url=broker)) as client:
        client.submit(ok, request_id="to-default", callback="celery://app.on_result")
        client.submit(missing, request_id="missing", callback="celery://app.on_result")
        client.submit(ok, request_id="nowhere")  # no callback, no MODQ_DEFAULT_CALLBACK
    found: list[tuple[dict[str, Any], Any]] = []
    deadline = time.monotonic() + 90
    while len(found) < 2 and time.monotonic() < deadline:
        found += drain_with_headers(broker, "celery")
        time.sleep(0.2)
    by_id = {
        ModerationResult.model_validate(body[0][0]).request_id: (headers, body)
        for headers, body in found
    }
    assert set(by_id) == {"to-default", "missing"}
    for headers, _ in by_id.values():
        assert headers["task"] == "app.on_result"
    assert redis.Redis.from_url(broker).llen("modq") == 0
    letters = _dead_letters(broker, 1)  # the not_found error result
    assert [letter["reason"] for letter in letters] == ["not_found"]
    _wait_for_log(worker.log, '"request_id": "nowhere"')
    text = worker.metrics()
    assert (
        _metric(text, "modq_verdicts_total", verdict="allow")
        + _metric(text, "modq_verdicts_total", verdict="review")
        + _metric(text, "modq_verdicts_total", verdict="block")
        == 1.0
    ), "only one was published"
    assert _metric(text, "modq_errors_total", code="not_found") == 1.0
    assert _metric(text, "modq_results_published_total", scheme="celery", status="ok") == 1.0
    build = [line for line in text.splitlines() if line.startswith("modq_build_info{")]
    assert len(build) == 1 and 'model="yahoo/open_nsfw"' in build[0] and "python=" in build[0]


def test_a_callback_that_cannot_be_routed_is_dead_lettered_and_not_counted(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """A worker whose own queue is Celery's default: ``celery://t`` has nowhere to go."""
    images = _images(tmp_path, 43)
    ok = (images / "ok.jpg").as_uri()
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images), "MODQ_QUEUE": "celery"})
    broker = start_worker.broker_url
    with Client(Settings(broker_url=broker, queue="celery")) as client:
        client.submit(ok, request_id="unroutable", callback="celery://app.on_result")
    [letter] = _dead_letters(broker, 1)
    assert letter["reason"] == "invalid_callback"
    # Refused before any work: the dead letter carries the error and the request, to replay.
    assert letter["result"]["status"] == Status.ERROR.value
    assert letter["result"]["error"]["code"] == "invalid_callback"
    assert letter["request"]["request_id"] == "unroutable"
    assert redis.Redis.from_url(broker).llen("celery") == 0, "handed to modq's own queue"
    text = worker.metrics()
    for verdict in ("allow", "review", "block"):
        assert _metric(text, "modq_verdicts_total", verdict=verdict) == 0.0
    assert _metric(text, "modq_dead_letters_total", reason="invalid_callback") == 1.0
    assert "callback refused" in worker.log()


def _wait_for_log(log: Any, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert needle in log(), f"{needle!r} not in the worker's log"


def _publish_raw(
    broker_url: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
    content_type: str = "application/json",
) -> None:
    """A message on modq's queue exactly as given: kombu's envelope, no Celery in between."""
    with Connection(broker_url) as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key="modq",
            headers=headers or {},
            content_type=content_type,
            content_encoding="utf-8",
        )


def _proto2(request: dict[str, Any]) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([[request], {}, embed]).encode()


def _answered_after(broker: str, images: Path, request_id: str) -> None:
    """The worker is alive and still moderating: a plain request gets its result."""
    collector = Collector(broker)
    with Client(Settings(broker_url=broker)) as client:
        client.submit((images / "ok.jpg").as_uri(), request_id=request_id, callback=CALLBACK)
    collector.wait_for(1, timeout=90)
    collector.close()
    assert request_id in collector.results


def _no_more_dead_letters(broker: str, seconds: float = 3.0) -> list[dict[str, Any]]:
    time.sleep(seconds)
    return [body[0][0] for body in drain(broker, "modq.dead")]


def test_callbacks_cannot_overwrite_modqs_or_kombus_keys(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """A stream or queue named after modq's queue, its dead-letter list, kombu's bookkeeping
    or a key under modq's prefix is refused as ``invalid_callback`` before any work: nothing
    is written there, the worker keeps working and later dead letters still land."""
    images = _images(tmp_path, 44)
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    client_redis = redis.Redis.from_url(broker)
    # The keys exist, with kombu's types, before the hostile callbacks arrive.
    assert client_redis.type("_kombu.binding.modq") == b"set"
    hostile = {
        "dead-stream": "redis-stream://modq.dead",
        "queue-stream": "redis-stream://modq",
        "unacked-stream": "redis-stream://unacked",
        "binding-stream": "redis-stream://_kombu.binding.modq",
        "prefix-stream": "redis-stream://modq:v1:result:x",
        "unacked-index-queue": "celery://t?queue=unacked_index",
        "mutex-queue": "celery://t?queue=unacked_mutex",
        "binding-queue": "celery://t?queue=_kombu.binding.celery",
        "dead-queue": "celery://t?queue=modq.dead",
    }
    with Client(Settings(broker_url=broker)) as client:
        for request_id, callback in hostile.items():
            client.submit((images / "ok.jpg").as_uri(), request_id=request_id, callback=callback)
    letters = _dead_letters(broker, len(hostile))
    assert sorted(letter["request"]["request_id"] for letter in letters) == sorted(hostile)
    for letter in letters:
        assert letter["reason"] == "invalid_callback"
        assert letter["result"]["status"] == Status.ERROR.value
        assert letter["result"]["error"]["code"] == "invalid_callback"
    for key in ("modq.dead", "modq", "unacked", "unacked_index", "unacked_mutex"):
        assert client_redis.type(key) in (b"none", b"list", b"hash", b"zset"), key
    assert client_redis.type("modq.dead") in (b"none", b"list")
    assert client_redis.type("_kombu.binding.modq") == b"set"
    assert client_redis.type("_kombu.binding.celery") in (b"none", b"set")
    assert not client_redis.exists("modq:v1:result:x")
    _answered_after(broker, images, "after-hostile")
    # A dead letter after them still lands in a list (it would fail WRONGTYPE on a stream).
    with Client(Settings(broker_url=broker)) as client:
        client.submit((images / "gone.jpg").as_uri(), request_id="gone", callback=CALLBACK)
    [gone] = _dead_letters(broker, 1)
    assert gone["reason"] == "not_found"
    assert worker.running
    text = worker.metrics()
    assert _metric(text, "modq_dead_letters_total", reason="invalid_callback") == len(hostile)


def test_foreign_messages_without_an_id_give_one_dead_letter_and_leave_the_worker_up(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """No ``id`` header (protocol 2) or field (protocol 1): Celery's own handling of the
    unknown task raises and stops the worker, and the restored message kills the next one."""
    images = _images(tmp_path, 45)
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    _publish_raw(broker, json.dumps({"hello": 1}).encode(), {"task": "other.task"})
    _publish_raw(broker, json.dumps({"task": "foo.bar"}).encode())
    letters = _dead_letters(broker, 2)
    letters += _no_more_dead_letters(broker)
    assert [letter["reason"] for letter in letters] == ["unknown_task", "unknown_task"]
    assert {letter["message"]["headers"].get("task") for letter in letters} == {
        "other.task",
        None,
    }
    assert worker.running, worker.log()[-3000:]
    _answered_after(broker, images, "after-no-id")
    assert "Unrecoverable error" not in worker.log()
    assert _metric(worker.metrics(), "modq_dead_letters_total", reason="unknown_task") == 2.0


def test_messages_celery_chokes_on_are_dead_lettered_as_malformed(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """A task header that is a list, ``modq.moderate`` without an ``id``, an ``eta`` Celery
    cannot read: each is dead-lettered once, removed, and the worker survives."""
    images = _images(tmp_path, 46)
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    request = {"request_id": "no-id", "image": (images / "ok.jpg").as_uri(), "callback": CALLBACK}
    _publish_raw(broker, _proto2(request), {"task": ["a"], "id": "list-task"})
    _publish_raw(broker, _proto2(request), {"task": "modq.moderate"})
    _publish_raw(
        broker, _proto2(request), {"task": "modq.moderate", "id": "bad-eta", "eta": "never"}
    )
    letters = _dead_letters(broker, 3)
    letters += _no_more_dead_letters(broker)
    by_reason = sorted(letter["reason"] for letter in letters)
    assert by_reason == ["invalid_task", "malformed_message", "malformed_message"], letters
    for letter in letters:
        assert letter["error"]
        assert letter["message"]["body"]
    listed = next(letter for letter in letters if letter["message"]["headers"]["task"] == ["a"])
    assert "task header" in listed["error"]
    assert worker.running, worker.log()[-3000:]
    _answered_after(broker, images, "after-malformed")
    assert "Unrecoverable error" not in worker.log()
    client = redis.Redis.from_url(broker)
    assert client.llen("modq") == 0
    deadline = time.monotonic() + 30
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.hlen("unacked") == 0, "a refused message was left unacked"


def test_json_celery_cannot_decode_is_dead_lettered_not_dropped(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    images = _images(tmp_path, 47)
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    request = {"request_id": "x", "image": (images / "ok.jpg").as_uri(), "callback": CALLBACK}
    headers = {"task": "modq.moderate", "id": "charset"}
    _publish_raw(broker, _proto2(request), headers, "application/json; charset=utf-8")
    _publish_raw(broker, b'[[{"request_id": ', {"task": "modq.moderate", "id": "broken"})
    compressed = {"task": "modq.moderate", "id": "zipped", "compression": "application/x-nope"}
    _publish_raw(broker, _proto2(request), compressed)
    _publish_raw(broker, b"\x80\x04K\x01.", {"task": "modq.moderate", "id": "pickled"},
                 "application/x-python-serialize")  # fmt: skip
    letters = _dead_letters(broker, 4)
    letters += _no_more_dead_letters(broker)
    reasons = {letter["message"]["headers"]["id"]: letter["reason"] for letter in letters}
    assert reasons == {
        "charset": "content_disallowed",
        "broken": "undecodable",
        "zipped": "undecodable",
        "pickled": "content_disallowed",
    }, letters
    pickled = next(letter for letter in letters if letter["message"]["headers"]["id"] == "pickled")
    assert pickled["message"]["body_encoding"] == "base64"  # kept, never unpickled
    assert worker.running
    _answered_after(broker, images, "after-undecodable")


def test_an_invalid_request_answer_does_not_claim_the_request_ids_webhook_id(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """A malformed message naming a real request id gets its ``invalid_request`` answer with a
    derived ``webhook-id``; the real request's verdict then keeps the request id as its own."""
    images = _images(tmp_path, 48)
    with https_side(tmp_path / "tls") as http:
        start_worker(
            {
                "MODQ_ALLOWED_ROOTS": str(images),
                "MODQ_WEBHOOK_SECRET": SECRET,
                "MODQ_HTTP_ALLOWED_NETWORKS": "127.0.0.1/32",
                "SSL_CERT_FILE": str(http.ca),
            }
        )
        broker = start_worker.broker_url
        hook = f"{http.url}/hook"
        bad = {"request_id": "shared", "image": 42, "callback": hook}
        _publish_raw(broker, _proto2(bad), {"task": "modq.moderate", "id": "bad-one"})
        collector = Collector(broker, http)
        collector.wait_for(1, timeout=90)
        with Client(Settings(broker_url=broker)) as client:
            client.submit((images / "ok.jpg").as_uri(), request_id="shared", callback=hook)
        collector.wait_for(2, timeout=90)
        collector.close()
        ids = [headers["webhook-id"] for headers, _ in http.received]
        keys = [headers["idempotency-key"] for headers, _ in http.received]
    invalid, real = collector.results["shared"]
    assert invalid.error is not None and invalid.error.code == "invalid_request"
    assert real.status is Status.OK
    assert ids[1] == "shared" and keys[1] == "shared"
    assert re.fullmatch(r"shared:invalid_request:[0-9a-f]{12}", ids[0]), ids
    assert keys[0] == ids[0]
