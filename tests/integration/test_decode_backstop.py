"""The decode backstop in a real `modq worker`: an image that no structural check refuses (a
plain PNG within the byte and pixel caps) but whose decode breaks the decoder processes'
memory budget is answered with its typed error; the worker stays up and answers the next."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import Observe
from tests.integration.conftest import WorkerFactory
from tests.support.corpus import EXAMPLES
from tests.support.receivers import STREAM, Collector
from tests.support.worker_process import WorkerProcess
from worker.config import Settings
from worker.decode import DecodeLimits, decode
from worker.messages import Status
from worker.queue.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

CALLBACK = f"redis-stream://{STREAM}"
BUDGET_MB = 64


def _decoders(worker: WorkerProcess) -> list[int]:
    """The worker's decoder processes: its descendants running worker.decode.child."""
    assert worker.process is not None
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [worker.process.pid]
    while pending:
        pid = pending.pop()
        for child in children.get(pid, []):
            pending.append(child)
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.decode.child" in command:
                found.append(child)
    return sorted(found)


def test_an_image_over_the_decode_budget_gets_its_error_and_the_worker_answers_the_next(
    start_worker: WorkerFactory, tmp_path: Path, observe: Observe
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    buffer = io.BytesIO()
    Image.new("RGBA", (5000, 5000), (200, 40, 90, 255)).save(buffer, "PNG", compress_level=1)
    heavy = buffer.getvalue()
    # In this process, without a backstop, it decodes: only the budget refuses it.
    decoded = decode(heavy, DecodeLimits(), None)
    assert decoded.frames[0].size == (5000, 5000)
    del decoded
    (root / "heavy.png").write_bytes(heavy)
    (root / "photo.jpg").write_bytes((EXAMPLES / "astronaut.jpg").read_bytes())
    worker = start_worker(
        {
            "MODQ_ALLOWED_ROOTS": str(root),
            "MODQ_DECODE_PROCESSES": "1",
            "MODQ_DECODE_MAX_MEMORY_MB": str(BUDGET_MB),
            "MODQ_MAX_RETRIES": "1",  # anything retryable would show up fast, as itself
        }
    )
    [decoder] = _decoders(worker)
    rss_before = worker.rss_mb()
    collector = Collector(start_worker.broker_url)
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        client.submit((root / "heavy.png").as_uri(), request_id="heavy", callback=CALLBACK)
        collector.wait_for(1, timeout=120)
        client.submit((root / "photo.jpg").as_uri(), request_id="photo", callback=CALLBACK)
        collector.wait_for(2, timeout=120)
    [refused], [photo] = collector.results["heavy"], collector.results["photo"]
    collector.close()
    assert refused.status is Status.ERROR and refused.error is not None, refused
    assert refused.error.code == "decode_budget_exceeded", refused.error
    assert not refused.error.retryable
    assert photo.status is Status.OK and photo.verdict is not None, photo
    assert worker.running, "the worker died"
    rss_after = worker.rss_mb()
    # The worker itself never held the image's 200 MB of pixels.
    assert rss_after - rss_before < 100, (rss_before, rss_after)
    [replacement] = _decoders(worker)
    assert replacement != decoder, "the decoder that ran out of memory was kept"
    observe(
        "image.backstop_memory",
        f"a 5000 x 5000 RGBA PNG ({len(heavy) // 1024} KiB; decodes in-process) to a worker "
        f"with one decoder process and MODQ_DECODE_MAX_MEMORY_MB={BUDGET_MB}: "
        f"`{refused.error.code}` (retryable: {refused.error.retryable}), its decoder "
        f"process replaced (pid {decoder} → {replacement}); the next request, a photo, got "
        f"`{photo.verdict.value}`; worker alive, RSS {rss_before:.0f} → {rss_after:.0f} MB",
        sent=2,
        received=collector.count,
    )
