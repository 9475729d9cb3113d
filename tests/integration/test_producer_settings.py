"""The producer API reads only what a producer needs: importing it reads no environment and
builds no Celery app, and a variable only the worker uses, however wrong, cannot stop a
producer from enqueueing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing

import redis

from tests.support.redis_server import RedisServer
from worker.config import ProducerSettings, Settings

#: a value each worker-only setting's type refuses (a plain string field refuses none)
_BAD_BY_TYPE = {int: "not-a-number", float: "not-a-number", bool: "maybe", dict: "{not json"}


def _bad_worker_env() -> dict[str, str]:
    """Every setting a producer does not read, set to a value the worker would refuse."""
    env: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        if name in ProducerSettings.model_fields:
            continue
        kinds = {typing.get_origin(a) or a for a in typing.get_args(field.annotation)}
        kinds.add(typing.get_origin(field.annotation) or field.annotation)
        bad = next((_BAD_BY_TYPE[k] for k in _BAD_BY_TYPE if k in kinds), "\x7fnot-valid")
        env[f"MODQ_{name.upper()}"] = bad
    return env


_PROBE = """
import json, os, sys

class Recording(dict):
    read = []
    def __getitem__(self, key):
        Recording.read.append(key); return super().__getitem__(key)
    def get(self, key, default=None):
        Recording.read.append(key); return super().get(key, default)
    def __contains__(self, key):
        Recording.read.append(key); return super().__contains__(key)

real = os.environ
os.environ = Recording(real)
import worker.queue.client, worker.messages
from celery import _state
imported = {"env_read": [k for k in Recording.read if k.startswith("MODQ_")],
            "apps": len(list(_state._apps))}
os.environ = real
from worker.queue.client import submit
request_id = submit("file:///uploads/cat.jpg", metadata={"from": "probe"})
print(json.dumps({**imported, "request_id": request_id}))
"""


def test_a_producer_enqueues_whatever_the_worker_only_variables_say(
    redis_server: RedisServer, db_pair: int
) -> None:
    broker = f"redis://127.0.0.1:{redis_server.port}/{db_pair}"
    bad = _bad_worker_env()
    assert {"MODQ_MAX_BATCH_SIZE", "MODQ_DEVICE", "MODQ_PRECISION", "MODQ_CACHE_TTL_S"} <= set(bad)
    # The worker itself refuses these values: they really are invalid.
    worker = subprocess.run(
        [sys.executable, "-c", "from worker.config import Settings; Settings()"],
        env={**os.environ, **bad, "MODQ_BROKER_URL": broker},
        capture_output=True,
        text=True,
    )
    assert worker.returncode != 0 and "max_batch_size" in worker.stderr

    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**os.environ, **bad, "MODQ_BROKER_URL": broker, "MODQ_QUEUE": "uploads"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["env_read"] == [] and seen["apps"] == 0

    client = redis.Redis.from_url(broker)
    try:
        (raw,) = client.lrange("uploads", 0, -1)  # on the queue MODQ_QUEUE names
        envelope = json.loads(raw)
        assert envelope["headers"]["id"] == seen["request_id"]
        assert envelope["headers"]["task"] == "modq.moderate"
    finally:
        client.flushdb()
        client.close()
