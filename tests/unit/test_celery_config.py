"""The Celery side of queue mode without a broker: configuration, producer imports, backoff."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

from worker.config import Settings
from worker.errors import ConfigError
from worker.queue.app import check_visibility_timeout, create_app
from worker.queue.client import Client
from worker.queue.tasks import backoff_seconds

HEAVY = ("torch", "timm", "transformers", "boto3", "botocore", "onnxruntime")


def test_importing_the_client_pulls_in_no_model_or_cloud_library() -> None:
    code = (
        "import sys, json, worker.queue.client, worker.messages\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


def test_the_app_is_json_only_with_late_acks() -> None:
    conf = create_app(Settings(broker_url="redis://127.0.0.1:1/0")).conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 3600


def test_a_pickled_message_is_refused_before_it_is_read() -> None:
    content_type, encoding, body = dumps({"request_id": "x"}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=["json"])


def test_a_visibility_timeout_shorter_than_a_task_stops_the_worker() -> None:
    check_visibility_timeout(Settings(visibility_timeout_s=3600))
    with pytest.raises(ConfigError, match="MODQ_VISIBILITY_TIMEOUT_S"):
        check_visibility_timeout(
            Settings(visibility_timeout_s=300, task_time_limit_s=300, retry_backoff_max_s=60)
        )


def test_backoff_grows_and_is_capped() -> None:
    assert 0.5 <= backoff_seconds(0, 120) <= 1.0
    assert 4.0 <= backoff_seconds(3, 120) <= 8.0
    assert all(backoff_seconds(n, 120) <= 120 for n in range(40))


def test_the_client_validates_before_sending() -> None:
    client = Client(Settings(broker_url="redis://127.0.0.1:1/0"))
    with pytest.raises(ValueError, match="image must use one of"):
        client.request("ftp://host/a.jpg")
    request = client.request("s3://b/k.jpg", callback="redis-stream://out", metadata={"a": "b"})
    assert request.request_id and request.callback == "redis-stream://out"


def test_transport_options_come_from_the_environment_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "MODQ_BROKER_TRANSPORT_OPTIONS",
        '{"unacked_restore_interval": 1, "visibility_timeout": 5}',
    )
    monkeypatch.setenv("MODQ_VISIBILITY_TIMEOUT_S", "900")
    options = create_app(Settings()).conf.broker_transport_options
    # The visibility timeout has its own, checked setting: the JSON cannot undercut it.
    assert options == {"unacked_restore_interval": 1, "visibility_timeout": 900}


def test_malloc_arenas_are_capped_on_glibc() -> None:
    import platform

    from worker.cli.queue import limit_malloc_arenas

    assert limit_malloc_arenas(0) is False
    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas(2) is True


def test_the_former_import_paths_still_work() -> None:
    """``worker.client`` and ``celery -A worker.celery_app`` are where 0.1.0 put the producer
    API and the app; both still lead to the queue package's."""
    code = (
        "import worker.client, worker.queue.client\n"
        "assert worker.client.submit is worker.queue.client.submit\n"
        "assert worker.client.Client is worker.queue.client.Client\n"
        "from worker.celery_app import app\n"
        "import worker.queue.app\n"
        "assert app is worker.queue.app.app\n"
        "app.loader.import_default_modules()\n"
        "assert 'modq.moderate' in app.tasks\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
