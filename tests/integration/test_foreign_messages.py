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
from tests.support.receivers import STREAM, Collector, drain
from worker.celery_app import create_app
from worker.client import Client
from worker.config import Settings
from worker.messages import ModerationResult, Status

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


def _raw_tasks(broker_url: str, queue: str) -> list[tuple[dict[str, Any], Any]]:
    """(headers, decoded body) of every message on ``queue``: what a Celery consumer reads."""
    found = []
    with Connection(broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(timeout=0.2)
            except simple.Empty:
                break
            found.append((dict(message.headers), json.loads(message.body)))
            message.ack()
        simple.close()
    return found


def test_unknown_tasks_and_headerless_messages_are_dead_lettered_not_dropped(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(distinct_images(1, seed=41)[0])
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
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(distinct_images(1, seed=42)[0])
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
        found += _raw_tasks(broker, "celery")
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
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(distinct_images(1, seed=43)[0])
    ok = (images / "ok.jpg").as_uri()
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images), "MODQ_QUEUE": "celery"})
    broker = start_worker.broker_url
    with Client(Settings(broker_url=broker, queue="celery")) as client:
        client.submit(ok, request_id="unroutable", callback="celery://app.on_result")
    [letter] = _dead_letters(broker, 1)
    assert letter["reason"] == "invalid_callback"
    assert letter["result"]["status"] == Status.OK.value  # the undelivered verdict, for replay
    assert redis.Redis.from_url(broker).llen("celery") == 0, "handed to modq's own queue"
    text = worker.metrics()
    for verdict in ("allow", "review", "block"):
        assert _metric(text, "modq_verdicts_total", verdict=verdict) == 0.0
    assert _metric(text, "modq_dead_letters_total", reason="invalid_callback") == 1.0
    assert "not published" in worker.log()


def _wait_for_log(log: Any, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert needle in log(), f"{needle!r} not in the worker's log"
