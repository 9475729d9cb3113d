"""A worker writes one log format on stderr, Celery's own lines included, and never two
records in one line, however many task threads log at once. ``MODQ_LOG_JSON`` switches the
format."""

from __future__ import annotations

import json
from pathlib import Path

from celery import Celery

from tests.integration.conftest import WorkerFactory
from tests.support.images import noise_jpeg
from tests.support.receivers import STREAM, Collector
from worker.config import Settings
from worker.queue.client import Client

CALLBACK = f"redis-stream://{STREAM}"


def _busy_worker(start_worker: WorkerFactory, root: Path, env: dict[str, str]) -> str:
    """A worker with sixteen task threads answering a mix that logs from every thread at
    once (verdicts, missing files, misshapen messages), then stopped; its stderr."""
    root.mkdir()
    for i in range(24):
        (root / f"{i}.jpg").write_bytes(noise_jpeg(400 + i))
    worker = start_worker(
        {
            "MODQ_ALLOWED_ROOTS": str(root),
            "MODQ_CONCURRENCY": "16",
            "MODQ_DEFAULT_CALLBACK": CALLBACK,
            **env,
        },
        separate_stderr=True,
    )
    collector = Collector(start_worker.broker_url)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        for i in range(24):
            client.submit((root / f"{i}.jpg").as_uri(), request_id=f"ok-{i}", callback=CALLBACK)
            missing = (root / f"missing-{i}.jpg").as_uri()
            client.submit(missing, request_id=f"gone-{i}", callback=CALLBACK)
    app = Celery(broker=start_worker.broker_url)
    for i in range(8):
        app.send_task("modq.moderate", args=(), kwargs={"nope": i}, queue="modq")
    collector.wait_for(24 * 2 + 8, timeout=120)
    app.close()
    assert worker.stop() == 0
    return worker.stderr()


def test_every_line_a_json_worker_writes_on_stderr_is_one_json_record(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    stderr = _busy_worker(start_worker, tmp_path / "uploads", {})
    lines = [line for line in stderr.splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # a line holding two records, or a bare traceback, fails here
        assert {"event", "level", "timestamp", "logger"} <= record.keys(), line
        records.append(record)
    loggers = {record["logger"] for record in records}
    events = " ".join(str(record["event"]) for record in records)
    assert any(name.startswith("celery") for name in loggers), loggers  # Celery's own lines
    assert any(name.startswith("worker") for name in loggers), loggers  # and modq's
    assert "succeeded" in events and "ready." in events
    assert len(records) >= 24 * 2 + 8  # at least one line a task


def test_modq_log_json_false_switches_the_worker_to_readable_lines(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    stderr = _busy_worker(start_worker, tmp_path / "uploads", {"MODQ_LOG_JSON": "false"})
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert any("ready." in line for line in lines)
    assert not [line for line in lines if line.lstrip().startswith("{")]
