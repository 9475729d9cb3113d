"""Queue mode end to end, all real: a `modq worker` process, its own redis-server, an
S3-compatible HTTP server, files on disk, and all three callback kinds.

200 requests mix S3 and file references, duplicates (the same bytes under another name,
sent after the first copy was answered), corrupt, missing and forbidden images, and https
images from a local server. Every request must get exactly one result at its callback, with
the verdict the same model gives in-process, blocked images must sit in quarantine and be
gone from their source, duplicates must come from the cache, errors must carry their codes.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import WorkerFactory
from tests.support.images import distinct_images, reference_scores
from tests.support.receivers import (
    RESULT_QUEUE,
    SECRET,
    STREAM,
    Collector,
    HttpSide,
    drain,
    https_side,
)
from tests.support.s3_server import S3Server
from worker.config import Settings
from worker.messages import CacheOutcome, ModerationResult, Status, Verdict
from worker.queue.client import Client

pytestmark = pytest.mark.integration


@pytest.fixture
def http_side(tmp_path: Path) -> Iterator[HttpSide]:
    with https_side(tmp_path / "tls") as side:
        yield side


@dataclass
class Sent:
    request_id: str
    image: str
    callback: str
    content: bytes | None  # None: not an image that can be scored
    expect_code: str | None = None
    duplicate: bool = False


def test_two_hundred_requests_each_answered_once(
    tmp_path: Path, s3_moto: S3Server, http_side: HttpSide, start_worker: WorkerFactory
) -> None:
    s3 = s3_moto.admin
    tag = uuid.uuid4().hex[:8]
    uploads_bucket = s3_moto.create_bucket(f"uploads-{tag}")
    quarantine_bucket = s3_moto.create_bucket(f"quarantine-{tag}")
    private_bucket = s3_moto.create_bucket(f"private-{tag}")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()

    s3_images = distinct_images(40, seed=1)
    file_images = distinct_images(40, seed=2)
    http_images = distinct_images(10, seed=3)
    scores = reference_scores(s3_images + file_images + http_images)
    block_at = float(np.median(list(scores.values())))
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"name": "e2e", "review_at": block_at, "block_at": block_at}))

    callbacks = [
        f"celery://e2e.collect?queue={RESULT_QUEUE}",
        f"redis-stream://{STREAM}",
        f"{http_side.url}/hook",
    ]
    first: list[Sent] = []
    second: list[Sent] = []

    def callback(n: int) -> str:
        return callbacks[n % 3]

    for i, data in enumerate(s3_images):
        for copy, batch in ((0, first), (1, second)):
            s3.put_object(Bucket=uploads_bucket, Key=f"in/{i}-{copy}.jpg", Body=data)
            batch.append(
                Sent(
                    f"s3-{i}-{copy}",
                    f"s3://{uploads_bucket}/in/{i}-{copy}.jpg",
                    callback(i + copy),
                    data,
                    duplicate=copy == 1,
                )
            )
    for i, data in enumerate(file_images):
        for copy, batch in ((0, first), (1, second)):
            path = uploads / f"f{i}-{copy}.jpg"
            path.write_bytes(data)
            batch.append(
                Sent(
                    f"file-{i}-{copy}",
                    path.as_uri(),
                    callback(i + copy + 1),
                    data,
                    duplicate=copy == 1,
                )
            )
    for i, data in enumerate(http_images):
        http_side.images[f"/img/{i}.jpg"] = data
        first.append(Sent(f"http-{i}", f"{http_side.url}/img/{i}.jpg", callback(i), data))
    rng = np.random.default_rng(5)
    for i in range(5):
        bad = rng.bytes(2000)
        (uploads / f"corrupt-{i}.jpg").write_bytes(file_images[i][: 600 + 100 * i])
        s3.put_object(Bucket=uploads_bucket, Key=f"in/corrupt-{i}.png", Body=bad)
        first.append(
            Sent(
                f"corrupt-file-{i}",
                (uploads / f"corrupt-{i}.jpg").as_uri(),
                callback(i),
                None,
                "corrupt_image",
            )
        )
        second.append(
            Sent(
                f"corrupt-s3-{i}",
                f"s3://{uploads_bucket}/in/corrupt-{i}.png",
                callback(i + 1),
                None,
                "unsupported_format",
            )
        )
        first.append(
            Sent(
                f"missing-s3-{i}",
                f"s3://{uploads_bucket}/in/missing-{i}.jpg",
                callback(i + 2),
                None,
                "not_found",
            )
        )
        second.append(
            Sent(
                f"missing-file-{i}",
                (uploads / f"missing-{i}.jpg").as_uri(),
                callback(i),
                None,
                "not_found",
            )
        )
        (outside / f"secret-{i}.jpg").write_bytes(file_images[i])
        first.append(
            Sent(
                f"outside-{i}",
                (outside / f"secret-{i}.jpg").as_uri(),
                callback(i + 1),
                None,
                "forbidden_reference",
            )
        )
        s3.put_object(Bucket=private_bucket, Key=f"p{i}.jpg", Body=s3_images[i])
        second.append(
            Sent(
                f"private-{i}",
                f"s3://{private_bucket}/p{i}.jpg",
                callback(i + 2),
                None,
                "forbidden_reference",
            )
        )
    sent = first + second
    assert len(sent) == 200 and len({s.request_id for s in sent}) == 200

    worker = start_worker(
        {
            "MODQ_POLICY": str(policy_file),
            "MODQ_ALLOWED_ROOTS": str(uploads),
            "MODQ_ALLOWED_BUCKETS": uploads_bucket,
            "MODQ_QUARANTINE_URI": f"s3://{quarantine_bucket}/blocked/",
            "MODQ_WEBHOOK_SECRET": SECRET,
            "MODQ_HTTP_ALLOWED_NETWORKS": "127.0.0.1/32",
            "SSL_CERT_FILE": str(http_side.ca),
        }
    )
    collector = Collector(start_worker.broker_url, http_side)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        for phase in (first, second):
            requests = (
                client.request(s.image, request_id=s.request_id, callback=s.callback) for s in phase
            )
            for _ in client.send_many(requests):
                pass
            # The second copies go out only once the first are answered: they must hit.
            collector.wait_for(collector.count + len(phase))
        time.sleep(1.0)
        collector.poll()  # anything published twice would show up now
    assert worker.stop() == 0
    results = collector.results

    assert sorted(results) == sorted(s.request_id for s in sent)
    assert all(len(r) == 1 for r in results.values()), "a request was answered twice"
    by_id = {rid: r[0] for rid, r in results.items()}
    listing = s3.list_objects_v2(Bucket=quarantine_bucket).get("Contents", [])
    moved = {o["Key"] for o in listing}
    outcomes: Counter[str] = Counter()
    for s in sent:
        result = by_id[s.request_id]
        if s.expect_code is not None:
            assert result.status is Status.ERROR, s
            assert result.error is not None and result.error.code == s.expect_code, result
            continue
        assert s.content is not None
        sha256 = hashlib.sha256(s.content).hexdigest()
        assert result.status is Status.OK, result.error
        assert result.cache is not None
        outcome = result.cache.outcome
        outcomes[outcome.value] += 1
        if s.duplicate:
            # Same bytes as an answered request: from the cache, never the model.
            assert outcome in (CacheOutcome.EXACT, CacheOutcome.PERCEPTUAL), s
        if outcome is CacheOutcome.PERCEPTUAL:
            # A near-duplicate of a flagged image inherits its scores, by design; only an
            # unsafe verdict may travel that way.
            assert result.verdict is Verdict.BLOCK and result.cache.distance is not None, s
        else:
            assert result.nsfw_score == pytest.approx(scores[sha256], abs=1e-6), result.cache
            expected = Verdict.BLOCK if scores[sha256] >= block_at else Verdict.ALLOW
            assert result.verdict is expected, s
        _check_action(s, result, s3, moved, uploads_bucket, quarantine_bucket)
    assert outcomes["exact"] + outcomes["perceptual"] >= 80
    assert outcomes["miss"] >= 45  # the 90 first copies, less near-duplicates of flagged ones
    dead = drain(start_worker.broker_url, "modq.dead")
    assert sorted(d[0][0]["result"]["request_id"] for d in dead) == sorted(
        s.request_id for s in sent if s.expect_code
    )


def _check_action(
    s: Sent, result: ModerationResult, s3: Any, moved: set[str], uploads: str, quarantine: str
) -> None:
    blocked = result.verdict is Verdict.BLOCK
    if s.image.startswith("http"):
        return  # read-only: nothing to move
    assert result.action is not None
    if blocked:
        assert result.action.kind == "quarantine_move" and result.action.location
        key = result.action.location.removeprefix(f"s3://{quarantine}/")
        assert key in moved
        body = s3.get_object(Bucket=quarantine, Key=key)["Body"].read()
        assert body == s.content
    else:
        assert result.action.kind == "none"
    if s.image.startswith("s3://"):
        key = s.image.removeprefix(f"s3://{uploads}/")
        present = "Contents" in s3.list_objects_v2(Bucket=uploads, Prefix=key)
        assert present is not blocked, s
    else:
        assert Path(s.image.removeprefix("file://")).exists() is not blocked, s
