"""Load: thousands of requests through one `modq worker`, duplicates mixed in.

Every request must be answered exactly once, the worker's resident memory must stay flat
once it is warm, and the only Redis keys that grow with the load must be the cache's and
the stored results', all with a TTL. `make test` runs 2,000 requests; `make soak` 10,000.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Observe
from tests.integration.conftest import WorkerFactory
from tests.integration.faults import redis_keys, send_all, wait_until
from tests.support.images import distinct_images
from tests.support.ledger import Ledger, Upload
from tests.support.receivers import Collector
from tests.support.reliability import full_scale, scaled
from tests.support.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

# Keys Celery and kombu keep in the broker database whatever the load: bindings, the queues,
# the unacked bookkeeping, modq's sequence of pending requests, and this test's results stream.
BROKER_BOOKKEEPING = ("_kombu.", "unacked", "modq", "test-stream")


class RssSampler:
    """Samples the worker's resident memory once a second on a thread of its own."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(self.worker.rss_mb())


def _uploads(folder: Path, requests: int, unique: int) -> list[Upload]:
    folder.mkdir()
    contents = distinct_images(unique, seed=21, size=160)
    files = []
    for i, data in enumerate(contents):
        path = folder / f"{i}.jpg"
        path.write_bytes(data)
        files.append((path.as_uri(), data))
    rng = np.random.default_rng(22)
    # Each image once, then duplicates of random ones, shuffled together.
    picks = list(range(unique)) + [int(i) for i in rng.integers(0, unique, requests - unique)]
    rng.shuffle(picks)
    return [Upload(f"load-{n}", *files[i]) for n, i in enumerate(picks)]


def test_thousands_of_requests_through_one_worker(
    tmp_path: Path, start_worker: WorkerFactory, observe: Observe
) -> None:
    requests, unique = scaled(2_000, 10_000), scaled(400, 2_000)
    uploads = _uploads(tmp_path / "images", requests, unique)
    worker = start_worker({"MODQ_ALLOWED_ROOTS": str(tmp_path / "images")})
    collector = Collector(start_worker.broker_url)
    keys_before = redis_keys(start_worker.broker_url), redis_keys(start_worker.cache_url)
    started = time.monotonic()
    with RssSampler(worker) as rss:
        send_all(start_worker.broker_url, uploads)
        wait_until(
            lambda: collector.poll() or len(collector.results) >= requests // 10,
            timeout=300,
            what="warm-up",
        )
        warm = worker.rss_mb()
        wait_until(
            lambda: collector.poll() or len(collector.results) == requests,
            timeout=scaled(600, 1800),
            what=f"{requests} results",
            every=0.5,
        )
    elapsed = time.monotonic() - started
    time.sleep(2.0)
    end = worker.rss_mb()
    tally = Ledger(uploads).tally(collector.results)
    broker, cache = redis_keys(start_worker.broker_url), redis_keys(start_worker.cache_url)
    grown_broker = sorted(set(broker) - set(keys_before[0]))
    untimed_cache = sorted(k for k, ttl in cache.items() if ttl < 0)
    results = [r[0] for r in collector.results.values()]
    hits = sum(1 for r in results if r.cache is not None and r.cache.outcome.value != "miss")
    observe(
        "load.soak",
        f"{requests} requests ({unique} distinct images) in {elapsed:.0f} s "
        f"({requests / elapsed:.0f}/s, {hits} from the cache): {tally.words()}; worker RSS "
        f"{warm:.0f} MB warm, {end:.0f} MB at the end (peak {max(rss.samples, default=end):.0f}); "
        f"Redis: {len(cache)} cache/result keys, all with a TTL, {len(broker)} broker keys "
        f"({len(grown_broker)} new: {', '.join(grown_broker) or 'none'})",
        **tally.counts(),
        scale="full (MODQ_SOAK=1)" if full_scale() else "CI",
    )
    tally.assert_clean()
    assert tally.duplicates == 0, "a request was answered twice"
    # Duplicates come from the cache, but for those that ran beside their first copy.
    assert hits >= 0.8 * (requests - unique)
    assert end <= warm * 1.15 + 25, f"resident memory grew from {warm:.0f} to {end:.0f} MB"
    assert not untimed_cache, f"cache keys without a TTL: {untimed_cache[:5]}"
    # Results and verdicts live in the cache database; the broker's keys do not grow with load.
    assert all(k.startswith(BROKER_BOOKKEEPING) for k in broker), sorted(broker)[:10]
    assert len(broker) <= 12
    # Every request left the producers' record of pending requests once answered.
    assert not {"modq:v1:pending:modq", "modq:v1:pending:modq:messages"} & set(broker)
    assert "modq:v1:pending:seq" in broker, "the producer recorded nothing"
