"""Shared pieces of the fault and load tests: a world of uploads with a policy that blocks
about half of them, the settings that make redelivery quick, and waiting helpers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from kombu.exceptions import OperationalError

from tests.support.images import distinct_images, reference_scores
from tests.support.ledger import Ledger, Tally, Upload
from tests.support.receivers import STREAM, Collector
from tests.support.s3_server import S3Server
from tests.support.worker_process import WorkerProcess
from worker.config import Settings
from worker.queue.client import Client

__all__ = [
    "CALLBACK",
    "QUICK_REDELIVERY",
    "S3World",
    "gauge",
    "policy_file",
    "redis_keys",
    "send_all",
    "tolerant_poll",
    "wait_until",
]

CALLBACK = f"redis-stream://{STREAM}"

# A message held by a dead worker comes back after the visibility timeout; kombu looks for
# such messages every interval x throttle seconds (100 s by default). The tests shorten both,
# keeping the timeout above task time limit + retry wait as the worker demands, and look for
# requests the transport lost every second (30 s by default).
QUICK_REDELIVERY = {
    "MODQ_TASK_TIME_LIMIT_S": "20",
    "MODQ_RETRY_BACKOFF_MAX_S": "2",
    "MODQ_VISIBILITY_TIMEOUT_S": "25",
    "MODQ_PENDING_SWEEP_S": "1",
    "MODQ_BROKER_TRANSPORT_OPTIONS": json.dumps(
        {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    ),
}


def policy_file(folder: Path, contents: list[bytes]) -> Path:
    """A policy blocking the upper half of these images by their in-process score."""
    block_at = float(np.median(list(reference_scores(contents).values())))
    path = folder / "policy.json"
    path.write_text(json.dumps({"name": "faults", "review_at": block_at, "block_at": block_at}))
    return path


@dataclass
class S3World:
    """Distinct JPEG uploads in an S3 bucket, a quarantine bucket, and a policy that blocks
    about half of them."""

    s3: S3Server
    uploads_bucket: str
    quarantine_bucket: str
    uploads: list[Upload]
    policy: Path

    @classmethod
    def create(cls, folder: Path, s3: S3Server, count: int, seed: int) -> S3World:
        tag = uuid.uuid4().hex[:8]
        uploads_bucket = s3.create_bucket(f"uploads-{tag}")
        quarantine_bucket = s3.create_bucket(f"quarantine-{tag}")
        contents = distinct_images(count, seed)
        uploads = []
        for i, data in enumerate(contents):
            s3.admin.put_object(Bucket=uploads_bucket, Key=f"u/{i}.jpg", Body=data)
            uploads.append(Upload(f"{tag}-{i}", f"s3://{uploads_bucket}/u/{i}.jpg", data))
        return cls(s3, uploads_bucket, quarantine_bucket, uploads, policy_file(folder, contents))

    @property
    def env(self) -> dict[str, str]:
        return {
            "MODQ_POLICY": str(self.policy),
            "MODQ_ALLOWED_BUCKETS": self.uploads_bucket,
            "MODQ_QUARANTINE_URI": f"s3://{self.quarantine_bucket}/blocked/",
        }

    def source_holds(self, ref: str) -> bool:
        key = ref.removeprefix(f"s3://{self.uploads_bucket}/")
        listing = self.s3.admin.list_objects_v2(Bucket=self.uploads_bucket, Prefix=key)
        return any(o["Key"] == key for o in listing.get("Contents", []))

    def quarantine_holds(self, location: str) -> bytes | None:
        key = location.removeprefix(f"s3://{self.quarantine_bucket}/")
        try:
            body: bytes = self.s3.admin.get_object(Bucket=self.quarantine_bucket, Key=key)[
                "Body"
            ].read()
        except self.s3.admin.exceptions.NoSuchKey:
            return None
        return body

    def in_both_places(self) -> int:
        """Uploads whose verified copy sits in quarantine while the source is still there."""
        listing = self.s3.admin.list_objects_v2(Bucket=self.quarantine_bucket)
        copies = {o["Key"].rsplit("-", 1)[-1] for o in listing.get("Contents", [])}
        return sum(
            1
            for u in self.uploads
            if self.source_holds(u.ref) and u.ref.rsplit("/", 1)[-1] in copies
        )

    def wait_for_all(
        self, collector: Collector, timeout: float, what: str, settle: float = 1.0
    ) -> float:
        """Wait until every upload has a result, then ``settle`` seconds more so a late
        duplicate shows up; returns the seconds the wait took."""
        took = wait_until(
            lambda: collector.poll() or len(collector.results) == len(self.uploads),
            timeout=timeout,
            what=what,
        )
        time.sleep(settle)
        return took

    def tally(self, collector: Collector) -> Tally:
        collector.poll()
        return Ledger(self.uploads).tally(
            collector.results, self.source_holds, self.quarantine_holds
        )


def send_all(broker_url: str, uploads: list[Upload], callback: str = CALLBACK) -> None:
    with Client(Settings(broker_url=broker_url)) as client:
        requests = (
            client.request(u.ref, request_id=u.request_id, callback=callback) for u in uploads
        )
        for _ in client.send_many(requests):
            pass


def gauge(worker: WorkerProcess, name: str) -> float:
    for line in worker.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1
) -> float:
    """Poll ``condition``; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def tolerant_poll(collector: Collector) -> None:
    """Poll the callbacks, shrugging off a Redis that is down right now."""
    try:
        collector.poll()
    except (redis.ConnectionError, OSError, OperationalError):
        time.sleep(0.2)


def redis_keys(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        return {key.decode(): client.ttl(key) for key in client.scan_iter(count=1000)}
    finally:
        client.close()
