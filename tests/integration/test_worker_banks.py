"""A real `modq worker` matching uploads against a hash bank kept in its Redis, and the
bank switched off and on while it runs."""

from __future__ import annotations

import io
import time
from pathlib import Path

from tests.integration.conftest import WorkerFactory
from tests.support.images import textured
from tests.support.receivers import STREAM, Collector
from worker.banks import RedisBankStore, pdq_hash
from worker.config import Settings
from worker.messages import Status, Verdict
from worker.queue.client import Client


def test_the_worker_blocks_banked_uploads_and_follows_a_disable(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    known = textured(1, 360)
    buffer = io.BytesIO()
    known.resize((240, 240)).save(buffer, "JPEG", quality=70)  # a re-upload, not the original
    (uploads / "reupload.jpg").write_bytes(buffer.getvalue())
    textured(2, 360).save(uploads / "other.png")
    bank = RedisBankStore(start_worker.cache_url, "modq")
    assert bank.add("known-bad", [pdq_hash(known).hex], "test") == 1

    start_worker({"MODQ_ALLOWED_ROOTS": str(uploads), "MODQ_POLICY": "lenient"})
    collector = Collector(start_worker.broker_url)
    callback = f"redis-stream://{STREAM}"
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        client.submit(f"file://{uploads / 'reupload.jpg'}", request_id="b-1", callback=callback)
        client.submit(f"file://{uploads / 'other.png'}", request_id="b-2", callback=callback)
        collector.wait_for(2, timeout=120)
        [banked] = collector.results["b-1"]
        [other] = collector.results["b-2"]
        assert banked.status is Status.OK and banked.verdict is Verdict.BLOCK
        assert banked.bank is not None and banked.bank.bank == "known-bad"
        assert 0 < banked.bank.distance <= 31 and banked.nsfw_score is None
        assert other.bank is None and other.nsfw_score is not None

        bank.set_enabled("known-bad", False)
        time.sleep(2.5)  # the worker re-reads the bank list every 2 s
        client.submit(f"file://{uploads / 'reupload.jpg'}", request_id="b-3", callback=callback)
        collector.wait_for(3, timeout=120)
    [after] = collector.results["b-3"]
    assert after.bank is None and after.nsfw_score is not None
    bank.close()
    collector.close()
