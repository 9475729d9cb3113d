"""Fail closed, with real worker processes: a worker that cannot build its runtime exits
non-zero having taken no message; a failure injected at any stage of a delivery ends in a
published result or a requeue, never an ack with nothing; a request whose deliveries keep
killing the worker is answered ``too_many_deliveries`` and dead-lettered, while the requests
delivered beside it get their verdicts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import Observe
from tests.integration.conftest import WorkerFactory
from tests.integration.faults import wait_until
from tests.support.images import noise_jpeg
from tests.support.receivers import STREAM, Collector, drain
from tests.support.worker_process import ROOT, WorkerProcess, free_port
from worker.config import Settings
from worker.messages import Status
from worker.queue.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

CALLBACK = f"redis-stream://{STREAM}"
FAULT_WORKER = (sys.executable, "-m", "tests.support.fault_worker")


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        path.write_bytes(noise_jpeg(100 + i))
        paths.append(path)
    return paths


def _send(broker_url: str, requests: list[tuple[str, str]]) -> None:
    with Client(Settings(broker_url=broker_url)) as client:
        for request_id, ref in requests:
            client.submit(ref, request_id=request_id, callback=CALLBACK)


def _queued(broker_url: str, queue: str = "modq") -> tuple[int, int]:
    """(messages waiting on ``queue``, messages unacked by some worker)"""
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.llen(queue)), int(client.hlen("unacked"))
    finally:
        client.close()


# --- the runtime is built before the consumer starts ------------------------------------------


def _unbuildable(tmp_path: Path, busy_port: int) -> list[tuple[str, dict[str, str]]]:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    return [
        ("MODQ_MODEL", {"MODQ_MODEL": str(empty)}),
        ("MODQ_MODEL", {"MODQ_MODEL": str(tmp_path / "missing-model")}),
        ("MODQ_POLICY", {"MODQ_POLICY": str(tmp_path / "missing-policy.json")}),
        ("MODQ_QUARANTINE_URI", {"MODQ_QUARANTINE_URI": "ftp://nowhere/blocked/"}),
        ("MODQ_BANK_URL", {"MODQ_BANK_URL": f"redis://127.0.0.1:{free_port()}/0"}),
        # the metrics endpoint is part of the runtime: a worker that cannot serve it
        # would consume unobserved, with no pending-request sweeper
        ("MODQ_METRICS_PORT", {"MODQ_METRICS_PORT": str(busy_port)}),
    ]


def test_a_worker_that_cannot_build_its_runtime_exits_without_taking_a_message(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    [image] = _images(tmp_path / "images", 1)
    _send(start_worker.broker_url, [("closed-1", image.as_uri())])
    seen = []
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for setting, env in _unbuildable(tmp_path, busy.getsockname()[1]):
        worker = WorkerProcess(
            {
                "MODQ_BROKER_URL": start_worker.broker_url,
                "MODQ_CACHE_URL": start_worker.cache_url,
                "MODQ_ALLOWED_ROOTS": str(image.parent),
                "MODQ_CACHE_DIR": str(tmp_path / "modq-cache"),
                **env,
            },
            tmp_path / f"unbuildable-{len(seen)}.log",
        )
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="worker exited with 3"):
            worker.start(timeout=120)
        took = time.monotonic() - started
        log = worker.log()
        errors = [line for line in log.splitlines() if '"worker cannot start"' in line]
        assert len(errors) == 1, f"one clear error line, naming the setting:\n{log}"
        assert setting in errors[0], errors[0]
        assert "ready." not in log, "a worker that cannot moderate must never say ready"
        assert _queued(start_worker.broker_url) == (1, 0), "the message was taken"
        seen.append(f"{setting} ({json.loads(errors[0])['error'][:60]}…) exit 3 in {took:.1f} s")
    busy.close()
    collector = Collector(start_worker.broker_url)
    start_worker({"MODQ_ALLOWED_ROOTS": str(image.parent)})
    collector.wait_for(1, timeout=60)
    [result] = collector.results["closed-1"]
    assert result.status is Status.OK
    observe(
        "fault.unbuildable_runtime",
        f"{len(seen)} misconfigured workers: "
        + "; ".join(seen)
        + "; each logged one error naming its setting and never said ready; the request "
        "stayed on the queue (1 waiting, 0 unacked) and a correctly configured worker then "
        f"answered it ({result.verdict.value if result.verdict else result.status.value})",
        sent=1,
        received=1,
    )


def _celery(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("celery")), "-A", "worker.queue.app", "worker",
         "--without-gossip", "--without-mingle", *args],
        cwd=ROOT, env={"PATH": str(Path(sys.executable).parent), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def test_celery_own_command_line_runs_the_same_worker_or_none(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """`celery -A worker.queue.app worker`, as Flower users start workers: the runtime is
    built in the same place, so a bad setting exits the same way; and the pool is modq's
    threads pool whatever the command line asks (a forked prefork child would inherit the
    runtime without its batcher thread and hang every task until the time limit acked it)."""
    [image] = _images(tmp_path / "images", 1)
    env = {
        "MODQ_BROKER_URL": start_worker.broker_url,
        "MODQ_CACHE_URL": start_worker.cache_url,
        "MODQ_ALLOWED_ROOTS": str(image.parent),
        "MODQ_CACHE_DIR": str(tmp_path / "modq-cache"),
        "MODQ_METRICS_PORT": "0",
    }
    refused = _celery({**env, "MODQ_MODEL": str(tmp_path / "missing-model")})
    try:
        output, _ = refused.communicate(timeout=120)
    finally:
        if refused.poll() is None:  # it did not fail closed: never leave it consuming
            os.killpg(refused.pid, signal.SIGKILL)
            refused.communicate(timeout=30)
    assert refused.returncode == 3, output[-2000:]
    assert "MODQ_MODEL" in output and "ready." not in output
    assert _queued(start_worker.broker_url) == (0, 0)
    collector = Collector(start_worker.broker_url)
    _send(start_worker.broker_url, [("celery-cli-1", image.as_uri())])
    worker = _celery(env, "--pool=prefork")
    try:
        collector.wait_for(1, timeout=90)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    [result] = collector.results["celery-cli-1"]
    assert result.status is Status.OK
    assert "(thread)" in output, "the worker did not run modq's threads pool"


def test_a_forking_pool_is_refused() -> None:
    from celery.concurrency import get_implementation

    from worker.errors import ConfigError
    from worker.queue.tasks import _check_pool

    for pool in ("threads", "solo", get_implementation("threads")):
        _check_pool(pool)
    for pool in ("prefork", get_implementation("prefork"), "eventlet"):
        with pytest.raises(ConfigError, match="--pool=threads"):
            _check_pool(pool)


def test_a_message_of_the_wrong_shape_is_answered_not_dropped(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """A foreign producer calling the task with other arguments: Celery would raise before
    the task body and ack the message with nothing. Each gets `invalid_request` at the
    default callback and a dead letter."""
    [image] = _images(tmp_path / "images", 1)
    start_worker({"MODQ_ALLOWED_ROOTS": str(image.parent), "MODQ_DEFAULT_CALLBACK": CALLBACK})
    collector = Collector(start_worker.broker_url)
    valid = {"request_id": "shape-ok", "image": image.as_uri()}
    app = Celery(broker=start_worker.broker_url)
    shapes = {
        "shape-none": ((), {}),
        "shape-extra": ((valid,), {"extra": 1}),
        "shape-named": ((), {"msg": valid}),
        "shape-two": ((valid, valid), {}),
    }
    for task_id, (args, kwargs) in shapes.items():
        app.send_task("modq.moderate", args=args, kwargs=kwargs, queue="modq", task_id=task_id)
    app.send_task("modq.moderate", kwargs={"message": valid}, queue="modq", task_id="shape-ok")
    collector.wait_for(len(shapes) + 1, timeout=60)
    for task_id in shapes:
        [result] = collector.results[task_id]
        assert result.error is not None and result.error.code == "invalid_request", task_id
    assert collector.results["shape-ok"][0].status is Status.OK
    dead = drain(start_worker.broker_url, "modq.dead")
    assert sorted(d[0][0]["result"]["request_id"] for d in dead) == sorted(shapes)
    assert _queued(start_worker.broker_url) == (0, 0)
    app.close()


# --- a failure at any stage ends in a result or a requeue ------------------------------------

STAGES = ("validate", "stored", "assess", "store", "act", "publish", "dead-letter", "forget")


def _fault_env(
    root: Path, quarantine: Path, policy: Path, faults: dict[str, object]
) -> dict[str, str]:
    return {
        "MODQ_ALLOWED_ROOTS": str(root),
        "MODQ_QUARANTINE_URI": quarantine.as_uri(),
        "MODQ_POLICY": str(policy),
        "MODQ_RETRY_BACKOFF_MAX_S": "1",
        "MODQ_TEST_FAULTS": json.dumps(faults),
    }


def _block_policy(folder: Path) -> Path:
    path = folder / "block-all.json"
    path.write_text(json.dumps({"name": "block-all", "review_at": 0.0, "block_at": 0.0}))
    return path


def _stage_requests(root: Path) -> list[tuple[str, str]]:
    images = _images(root, len(STAGES))
    requests = []
    for stage, image in zip(STAGES, images, strict=True):
        # The dead letter follows error results only: that stage's request names no file.
        ref = (root / "missing.jpg").as_uri() if stage == "dead-letter" else image.as_uri()
        requests.append((f"fault-{stage}", ref))
    return requests


def test_a_failure_at_any_stage_is_retried_to_a_published_result(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    root = tmp_path / "uploads"
    requests = _stage_requests(root)
    env = _fault_env(root, tmp_path / "quarantine", _block_policy(tmp_path), {
        "raise": dict.fromkeys(STAGES, 1)
    })  # fmt: skip
    worker = start_worker(env, launcher=FAULT_WORKER)
    collector = Collector(start_worker.broker_url)
    # The plain request has an image of its own: under the block-all policy it moves its
    # file to quarantine, and a stage request sharing that file would then find it gone.
    plain = root / "plain.jpg"
    plain.write_bytes(noise_jpeg(999))
    _send(start_worker.broker_url, [*requests, ("plain-1", plain.as_uri())])
    wait_until(
        lambda: collector.poll() or len(collector.results) == len(requests) + 1,
        timeout=120,
        what="every request answered",
    )
    time.sleep(1.0)
    collector.poll()
    log = worker.log()
    outcomes = []
    for stage in STAGES:
        assert f"fault: raising at {stage} for fault-{stage}" in log, f"{stage} never fired"
        copies = collector.results[f"fault-{stage}"]
        assert len({c.model_dump_json() for c in copies}) == 1, f"{stage}: copies differ"
        first = copies[0]
        want = "not_found" if stage == "dead-letter" else "block"
        got = first.error.code if first.error else (first.verdict.value if first.verdict else "")
        assert got == want, f"{stage}: {got}"
        outcomes.append(f"{stage} → {got} ({len(copies)} identical)")
    assert _queued(start_worker.broker_url) == (0, 0)
    dead = drain(start_worker.broker_url, "modq.dead")
    assert [d[0][0]["request"]["request_id"] for d in dead].count("fault-dead-letter") >= 1
    observe(
        "fault.stage_raises",
        "one worker, each stage raising once for its own request, then passing: "
        + ", ".join(outcomes)
        + "; a plain request beside them answered; 0 messages left on the queue or unacked",
        sent=len(requests) + 1,
        received=len(collector.results),
        duplicates=collector.count - len(collector.results),
    )


def test_a_failure_that_never_clears_is_published_as_an_error_or_kept(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    root = tmp_path / "uploads"
    requests = _stage_requests(root)
    env = _fault_env(root, tmp_path / "quarantine", _block_policy(tmp_path), {
        "raise": dict.fromkeys(STAGES, -1)
    })  # fmt: skip
    env["MODQ_MAX_RETRIES"] = "1"
    worker = start_worker(env, launcher=FAULT_WORKER)
    collector = Collector(start_worker.broker_url)
    _send(start_worker.broker_url, requests)
    # Every stage but publishing can still get an answer out: an error result.
    answerable = [r for r, _ in requests if r != "fault-publish"]
    wait_until(
        lambda: collector.poll() or all(r in collector.results for r in answerable),
        timeout=120,
        what="an answer for every request that can be answered",
    )
    time.sleep(3.0)  # the publish fault's retries and requeues run meanwhile
    collector.poll()
    # Forgetting the producers' record is best effort once the result is out; a failing
    # dead-letter send leaves the error result published.
    expected = dict.fromkeys(answerable, "internal") | {
        "fault-dead-letter": "not_found",
        "fault-forget": "block",
    }
    outcomes = []
    for request_id in answerable:
        copies = collector.results[request_id]
        assert len({c.model_dump_json() for c in copies}) == 1, f"{request_id}: copies differ"
        first = copies[0]
        got = first.error.code if first.error else (first.verdict.value if first.verdict else "")
        outcomes.append(f"{request_id.removeprefix('fault-')} → {got}")
        assert got == expected[request_id], f"{request_id}: {got}"
    assert "fault-publish" not in collector.results
    waiting, unacked = _queued(start_worker.broker_url)
    assert waiting + unacked >= 1 or "fault: raising at publish" in worker.log()
    # The unanswerable message is never acked: stop the worker and find it again.
    assert worker.stop() == 0
    waiting, unacked = _queued(start_worker.broker_url)
    assert waiting + unacked == 1, (waiting, unacked)
    observe(
        "fault.stage_raises_always",
        "each stage raising every time for its own request, with MODQ_MAX_RETRIES=1: "
        + ", ".join(outcomes)
        + "; the request whose every publication fails got no result and was never acked "
        f"(after the worker stopped: {waiting} waiting, {unacked} unacked)",
        sent=len(requests),
        received=len(collector.results),
    )


# --- poison messages ----------------------------------------------------------------------

# Quick redelivery: a dead worker's message is visible again after 6 s, and kombu looks
# for such messages every second; a dead holder's lease frees after 2 s.
POISON_ENV = {
    "MODQ_TASK_TIME_LIMIT_S": "4",
    "MODQ_RETRY_BACKOFF_MAX_S": "1",
    "MODQ_VISIBILITY_TIMEOUT_S": "6",
    "MODQ_LEASE_TTL_S": "2",
    "MODQ_PENDING_SWEEP_S": "0",
    "MODQ_MAX_WAIT_MS": "300",
    "MODQ_BROKER_TRANSPORT_OPTIONS": json.dumps(
        {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    ),
    "MODQ_TEST_FAULTS": json.dumps({"kill": ["assess"]}),
}


def test_a_message_that_kills_its_worker_is_answered_and_dead_lettered(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    root = tmp_path / "uploads"
    images = _images(root, 9)
    poison = ("poison-1", images[0].as_uri())
    neighbours = [(f"beside-{i}", image.as_uri()) for i, image in enumerate(images[1:])]
    env = {**POISON_ENV, "MODQ_ALLOWED_ROOTS": str(root)}
    collector = Collector(start_worker.broker_url)
    _send(start_worker.broker_url, [poison, *neighbours])
    deaths = 0
    started = time.monotonic()
    while "poison-1" not in collector.results:
        assert deaths <= 6, f"the poison message killed {deaths} workers and was never answered"
        worker = start_worker(env, launcher=FAULT_WORKER)
        assert worker.process is not None
        while worker.running and "poison-1" not in collector.results:
            collector.poll()
            assert time.monotonic() - started < 240, "timed out"
        if not worker.running:
            deaths += 1
            worker.wait(10)
    wait_until(
        lambda: collector.poll() or len(collector.results) == len(neighbours) + 1,
        timeout=60,
        what="every neighbour answered",
    )
    [answer] = collector.results["poison-1"]
    assert answer.error is not None and answer.error.code == "too_many_deliveries"
    assert not answer.error.retryable
    assert deaths == 3, f"{deaths} workers died; MODQ_MAX_DELIVERIES is 3"
    verdicts = {r: collector.results[r][0] for r, _ in neighbours}
    assert all(v.status is Status.OK for v in verdicts.values()), verdicts
    dead = drain(start_worker.broker_url, "modq.dead")
    reasons = {d[0][0]["request"]["request_id"]: d[0][0]["reason"] for d in dead}
    assert reasons == {"poison-1": "too_many_deliveries"}
    observe(
        "fault.poison",
        f"a request whose processing SIGKILLs its worker, sent with {len(neighbours)} others "
        f"(batches wait 300 ms, so they share the poison's batches): {deaths} workers died, "
        f"then the 4th delivery answered `too_many_deliveries` before any work and "
        f"dead-lettered it; {len(verdicts)}/{len(neighbours)} neighbours got verdicts "
        f"({sum(len(collector.results[r]) for r in verdicts) - len(verdicts)} re-publications); "
        f"took {time.monotonic() - started:.0f} s",
        sent=len(neighbours) + 1,
        received=len(collector.results),
    )
