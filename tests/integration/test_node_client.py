"""A producer and a consumer that are not modq: `examples/node`, in Node.js, against a real
`modq worker`. The producer writes Celery protocol 2 messages straight onto modq's Redis
queue; the consumer reads results from a Redis stream. Both validate what they send and
receive against `schemas/`, and so does this test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from jsonschema import Draft202012Validator

from tests.integration.conftest import WorkerFactory
from tests.support.images import distinct_images
from tests.support.worker_process import ROOT
from worker.messages import ModerationResult, Status

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "node"
SCHEMAS = ROOT / "schemas"
STREAM = "node-results"
CALLBACK = f"redis-stream://{STREAM}"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:  # the example is part of the contract: no Node.js is a failure
        pytest.fail(f"{name} is not on PATH; the Node.js example cannot be checked")
    return found


@pytest.fixture(scope="session")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example in a folder of its own with its pinned dependencies (`npm ci`, once)."""
    folder = tmp_path_factory.mktemp("node-example")
    for name in ("package.json", "package-lock.json", "lib.js", "producer.js", "consumer.js"):
        shutil.copy(EXAMPLE / name, folder / name)
    subprocess.run(
        [_tool("npm"), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        check=True,
        timeout=300,
    )
    return folder


def _node(folder: Path, script: str, *args: str) -> list[str]:
    return [_tool("node"), str(folder / script), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "MODQ_SCHEMAS": str(SCHEMAS)}


def test_node_producer_and_consumer_round_trip_through_a_real_worker(
    node_example: Path, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for n, data in enumerate(distinct_images(2, seed=51)):
        (images / f"{n}.jpg").write_bytes(data)
    refs = [(images / "0.jpg").as_uri(), (images / "1.jpg").as_uri()]
    refs.append((images / "missing.jpg").as_uri())
    start_worker({"MODQ_ALLOWED_ROOTS": str(images)})
    broker = start_worker.broker_url
    consumer = subprocess.Popen(
        _node(node_example, "consumer.js", "--redis", broker, "--stream", STREAM, "--count", "3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    produced = subprocess.run(
        _node(node_example, "producer.js", "--broker", broker, "--callback", CALLBACK, *refs),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert produced.returncode == 0, produced.stderr
    sent = dict(line.split("\t") for line in produced.stdout.splitlines())
    assert sorted(sent.values()) == sorted(refs)
    out, err = consumer.communicate(timeout=180)
    assert consumer.returncode == 0, err

    result_schema = Draft202012Validator(
        json.loads((SCHEMAS / "moderation_result.v1.json").read_text())
    )
    results = {}
    for line in out.splitlines():
        document = json.loads(line)
        result_schema.validate(document)
        result = ModerationResult.model_validate(document)
        results[result.request_id] = result
    assert set(results) == set(sent)
    for request_id, image in sent.items():
        result = results[request_id]
        assert result.image == image
        if image.endswith("missing.jpg"):
            assert result.status is Status.ERROR and result.error is not None
            assert result.error.code == "not_found"
        else:
            assert result.status is Status.OK and result.verdict is not None
            assert result.model is not None and result.hashes is not None
    client = redis.Redis.from_url(broker)
    assert client.llen("modq") == 0
    _wait_until_acked(client)
    assert client.xpending(STREAM, "node-example")["pending"] == 0, "results left unacked"


def test_node_producer_refuses_a_request_the_schema_refuses(
    node_example: Path, start_worker: WorkerFactory
) -> None:
    broker = start_worker.broker_url  # no worker: nothing may reach the queue at all
    produced = subprocess.run(
        _node(node_example, "producer.js", "--broker", broker, "ftp://host/cat.jpg"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert produced.returncode == 1
    assert "moderation_request.v1.json: /image must match pattern" in produced.stderr
    assert redis.Redis.from_url(broker).llen("modq") == 0


def _wait_until_acked(client: redis.Redis, timeout: float = 30.0) -> None:
    """A message is acked just after its result is published: give the worker that moment."""
    deadline = time.monotonic() + timeout
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.hlen("unacked") == 0, "messages left unacked"
