"""How a real `modq worker` process behaves beyond the happy path: retries, retries running
out, a dead cache Redis, invalid and pickled messages, `modq submit`, metrics and logs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import WorkerFactory
from tests.support.receivers import STREAM, Collector, HttpSide, drain, https_side
from tests.support.redis_server import free_port
from tests.support.s3_server import S3Server
from worker.config import Settings
from worker.messages import CacheOutcome, Status
from worker.queue.client import Client

pytestmark = pytest.mark.integration

CALLBACK = f"redis-stream://{STREAM}"


def _jpeg(seed: int, size: int = 160) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def http(tmp_path: Path) -> Iterator[HttpSide]:
    with https_side(tmp_path / "tls") as side:
        yield side


def _http_env(http: HttpSide, **extra: str) -> dict[str, str]:
    return {"MODQ_HTTP_ALLOWED_NETWORKS": "127.0.0.1/32", "SSL_CERT_FILE": str(http.ca), **extra}


def test_a_failing_fetch_is_retried_with_backoff_then_answered(
    start_worker: WorkerFactory, http: HttpSide
) -> None:
    http.images["/a.jpg"] = _jpeg(1)
    http.failures["/a.jpg"] = 2  # two 503s, then the image
    worker = start_worker(_http_env(http))
    collector = Collector(start_worker.broker_url)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        client.submit(f"{http.url}/a.jpg", request_id="retry-1", callback=CALLBACK)
    collector.wait_for(1, timeout=60)
    [result] = collector.results["retry-1"]
    assert result.status is Status.OK
    assert http.gets.count("/a.jpg") == 3
    assert 'modq_retries_total{code="storage_unavailable"} 2.0' in worker.metrics()


def test_when_retries_run_out_the_error_is_published_and_dead_lettered(
    start_worker: WorkerFactory, http: HttpSide
) -> None:
    http.images["/b.jpg"] = _jpeg(2)
    http.failures["/b.jpg"] = 1000
    start_worker(_http_env(http, MODQ_MAX_RETRIES="1"))
    collector = Collector(start_worker.broker_url)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        client.submit(f"{http.url}/b.jpg", request_id="exhausted", callback=CALLBACK)
    collector.wait_for(1, timeout=60)
    [result] = collector.results["exhausted"]
    assert result.error is not None
    assert result.error.code == "storage_unavailable" and result.error.retryable
    [dead] = drain(start_worker.broker_url, "modq.dead")
    assert dead[0][0]["reason"] == "storage_unavailable"
    assert dead[0][0]["request"]["request_id"] == "exhausted"


def test_with_the_cache_redis_unreachable_the_worker_keeps_classifying(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(_jpeg(10 + i))
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    # The banks live elsewhere and can be read: a bank store named by the settings that
    # cannot be read at start stops the worker (test_fail_closed), a dead cache does not.
    worker = start_worker(
        {
            "MODQ_CACHE_URL": dead_redis,
            "MODQ_BANK_URL": start_worker.cache_url,
            "MODQ_ALLOWED_ROOTS": str(images),
        }
    )
    collector = Collector(start_worker.broker_url)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        for i in range(3):
            client.submit((images / f"{i}.jpg").as_uri(), request_id=f"nc-{i}", callback=CALLBACK)
    collector.wait_for(3, timeout=60)
    for i in range(3):
        [result] = collector.results[f"nc-{i}"]
        assert result.status is Status.OK and result.cache is not None
        assert result.cache.outcome is CacheOutcome.MISS
    assert "cache unavailable" in worker.log()


def test_modq_submit_pages_through_a_bucket_and_the_worker_reports_metrics_and_logs(
    start_worker: WorkerFactory, s3_moto: S3Server
) -> None:
    bucket = s3_moto.create_bucket(f"submit-{uuid.uuid4().hex[:8]}")
    for i in range(12):
        s3_moto.admin.put_object(Bucket=bucket, Key=f"day1/{i}.jpg", Body=_jpeg(30 + i))
    s3_moto.admin.put_object(Bucket=bucket, Key="other/x.jpg", Body=_jpeg(99))
    worker = start_worker({"MODQ_ALLOWED_BUCKETS": bucket})
    env = {**worker.env, "MODQ_ALLOWED_BUCKETS": bucket}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("modq")), "submit", f"s3://{bucket}/day1/",
         "--recursive", "--callback", CALLBACK],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert sorted(ref for _, ref in lines) == sorted(
        f"s3://{bucket}/day1/{i}.jpg" for i in range(12)
    )
    collector = Collector(start_worker.broker_url)
    collector.wait_for(12, timeout=60)
    assert sorted(collector.results) == sorted(request_id for request_id, _ in lines)
    metrics = worker.metrics()
    for name in (
        "modq_batch_size_bucket",
        "modq_forward_seconds_count",
        "modq_batch_queue_wait_seconds_count",
        'modq_cache_total{outcome="miss"}',
        "modq_verdicts_total",
        "modq_in_flight",
        'modq_results_published_total{scheme="redis-stream",status="ok"} 12.0',
    ):
        assert name in metrics, name
    logged = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    published = [entry for entry in logged if entry.get("event") == "published"]
    assert {entry["request_id"] for entry in published} == set(collector.results)
    assert all(entry["sha256"] and entry["model"] == "opennsfw" for entry in published)


def test_flower_sees_the_worker_and_its_tasks(start_worker: WorkerFactory, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "f.jpg").write_bytes(_jpeg(40))
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    port = free_port()
    env = {**worker.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    celery = Path(sys.executable).with_name("celery")
    flower = subprocess.Popen(
        [str(celery), "-A", "worker.queue.app", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # The worker sends no task events of its own (MODQ_TASK_EVENTS is off): Flower turns
        # them on when it connects. A request sent before that is seen as sent only, so one
        # is sent every two seconds until Flower sees one succeed.
        collector = Collector(start_worker.broker_url)
        deadline = time.monotonic() + 60
        tasks: dict[str, Any] = {}
        sent: list[str] = []
        next_send = 0.0
        while time.monotonic() < deadline and not any(
            t.get("state") == "SUCCESS" for t in tasks.values()
        ):
            time.sleep(0.5)
            try:
                workers = httpx.get(f"http://127.0.0.1:{port}/api/workers?refresh=1").json()
            except (httpx.HTTPError, ValueError):
                continue
            seen = any(name.startswith("modq@") for name in workers)
            if seen and time.monotonic() >= next_send:
                request_id = f"fl-{len(sent) + 1}"
                with Client(Settings(broker_url=start_worker.broker_url)) as client:
                    client.submit(
                        (images / "f.jpg").as_uri(), request_id=request_id, callback=CALLBACK
                    )
                sent.append(request_id)
                next_send = time.monotonic() + 2
            if sent:
                tasks = httpx.get(f"http://127.0.0.1:{port}/api/tasks").json()
        collector.wait_for(len(sent), timeout=30)
        succeeded = [i for i in sent if tasks.get(i, {}).get("state") == "SUCCESS"]
        assert succeeded, tasks
        assert all(tasks[i]["name"] == "modq.moderate" for i in succeeded)
    finally:
        flower.terminate()
        flower.wait(10)
