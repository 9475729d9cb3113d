"""A real `modq worker` writing a heatmap for each review verdict under an S3 prefix (over
HTTP to the S3-compatible server) and naming it in the published result."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from tests.integration.conftest import WorkerFactory
from tests.support.images import distinct_images
from tests.support.receivers import STREAM, Collector
from tests.support.s3_server import S3Server
from worker.config import Settings
from worker.messages import Verdict
from worker.queue.client import Client
from worker.storage import parse_s3_ref


def test_review_verdicts_carry_a_heatmap_in_the_bucket(
    start_worker: WorkerFactory, s3_moto: S3Server, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for i, data in enumerate(distinct_images(3, seed=12, size=256)):
        (uploads / f"{i}.jpg").write_bytes(data)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"name": "review-all", "review_at": 0.0, "block_at": 1.0}))
    s3 = s3_moto.client()
    s3.create_bucket(Bucket="heatmaps")
    start_worker(
        {
            "MODQ_ALLOWED_ROOTS": str(uploads),
            "MODQ_POLICY": str(policy),
            "MODQ_REVIEW_HEATMAPS_URI": "s3://heatmaps/review/",
        }
    )
    collector = Collector(start_worker.broker_url)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        for i in range(3):
            client.submit(
                f"file://{uploads / f'{i}.jpg'}",
                request_id=f"heat-{i}",
                callback=f"redis-stream://{STREAM}",
            )
    collector.wait_for(3, timeout=120)
    for i in range(3):
        [result] = collector.results[f"heat-{i}"]
        assert result.verdict is Verdict.REVIEW and result.hashes is not None
        location = parse_s3_ref(str(result.explanation))
        assert location.bucket == "heatmaps"
        assert location.key == f"review/{result.hashes.sha256}.png"
        body = s3.get_object(Bucket="heatmaps", Key=location.key)["Body"].read()
        with Image.open(io.BytesIO(body)) as png:
            assert png.format == "PNG" and png.size == (256 + 8 * i, 256 + 8 * i)
    collector.close()
