"""Overlapping deliveries of one request across horizontally scaled workers.

Three real `modq worker` processes share one queue; three producers send every request at
the same time (same request ids), and the busiest worker is killed with SIGKILL mid-run. The
per-request lease must let one delivery fetch, classify and quarantine while the others wait
and re-publish its stored result. Counted for real: the results on the callback stream, the
objects in the quarantine bucket, the S3 server's own request log (GETs of each upload) and
the workers' logs (which delivery worked on a request, which re-published it).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import Observe
from tests.integration.conftest import WorkerFactory
from tests.integration.faults import QUICK_REDELIVERY, S3World, gauge, send_all, wait_until
from tests.support.ledger import Tally
from tests.support.receivers import STREAM, Collector
from tests.support.reliability import scaled
from tests.support.s3_server import S3Server
from tests.support.worker_process import WorkerProcess
from worker.messages import Verdict

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

COPIES = 3  # producers, each sending every request once, all at the same time
WORKERS = 3

ENV = {
    **QUICK_REDELIVERY,
    # The killed worker's messages come back 15 s after it took them (the task limit and
    # retry wait stay below, as the worker demands), and the leases it held free within 3 s.
    "MODQ_TASK_TIME_LIMIT_S": "12",
    "MODQ_VISIBILITY_TIMEOUT_S": "15",
    "MODQ_LEASE_TTL_S": "3",
    "MODQ_MAX_BATCH_SIZE": "8",
    "MODQ_MAX_WAIT_MS": "20",
    "MODQ_THREADS": "1",  # three workers share the machine's cores
}


def _key(world: S3World, ref: str) -> str:
    return ref.removeprefix(f"s3://{world.uploads_bucket}/")


def source_reads(world: S3World) -> Counter[str]:
    """Per request id: GETs of its upload's key that the S3 server answered 200, from the
    server's own request log."""
    line = re.compile(
        rf'"GET /{re.escape(world.uploads_bucket)}/(\S+?)(?:\?\S*)? HTTP/[\d.]+" 200 '
    )
    reads = Counter(m[1] for m in line.finditer(world.s3.log_tail(chars=1 << 30)))
    return Counter({u.request_id: reads[_key(world, u.ref)] for u in world.uploads})


def quarantine_copies(world: S3World) -> Counter[str]:
    """Per request id: copies of its upload in the quarantine bucket
    (``<prefix><sha256[:16]>-<name>``), the records beside them (``.json``) left out."""
    listing = world.s3.admin.list_objects_v2(Bucket=world.quarantine_bucket)
    names = [o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", [])]
    by_name = {_key(world, u.ref).rsplit("/", 1)[-1]: u.request_id for u in world.uploads}
    return Counter(by_name[n.split("-", 1)[1]] for n in names if not n.endswith(".json"))


def events(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    """The worker's log events of one kind (the JSON lines)."""
    marker = f'"event": "{event}"'
    # Celery's own plain lines share stderr and may land on the end of a JSON line.
    decoder = json.JSONDecoder()
    return [
        decoder.raw_decode(line[line.index('{"') :])[0]
        for line in worker.log().splitlines()
        if marker in line and '{"' in line
    ]


def received(worker: WorkerProcess) -> set[str]:
    """Request ids of the deliveries this worker took from the broker (Celery's log)."""
    return set(re.findall(r"Task modq\.moderate\[([^\]]+)\] received", worker.log()))


def settled(broker_url: str, collector: Collector, want: int) -> bool:
    """Every request answered, and no message queued or held unacked by any worker, dead or
    alive: the killed worker's deliveries came back and were answered too."""
    collector.poll()
    if len(collector.results) < want:
        return False
    broker = redis.Redis.from_url(broker_url)
    try:
        return broker.llen("modq") == 0 and broker.hlen("unacked") == 0
    finally:
        broker.close()


def kill_mid_run(
    workers: list[WorkerProcess], broker_url: str, uploads: int
) -> tuple[WorkerProcess, int, int]:
    """SIGKILL the worker with the most images in flight, once some results are out;
    returns it, its images in flight and the results published before the kill."""
    broker = redis.Redis.from_url(broker_url)
    in_flight = [0.0] * len(workers)

    def ripe() -> bool:
        out = int(broker.xlen(STREAM))
        if out >= uploads * COPIES:
            return True  # all done: too late, said below
        in_flight[:] = [gauge(w, "modq_in_flight") for w in workers]
        return out >= COPIES and max(in_flight) >= 2

    try:
        wait_until(ripe, timeout=120, what="results out and images in flight", every=0.01)
        victim = workers[in_flight.index(max(in_flight))]
        assert victim.kill() == -9
        return victim, int(max(in_flight)), int(broker.xlen(STREAM))
    finally:
        broker.close()


def test_overlapping_deliveries_on_three_workers_one_killed(
    tmp_path: Path, start_worker: WorkerFactory, s3_moto: S3Server, observe: Observe
) -> None:
    world = S3World.create(tmp_path, s3_moto, count=scaled(48, 256), seed=21)
    workers = [start_worker({**world.env, **ENV}) for _ in range(WORKERS)]
    collector = Collector(start_worker.broker_url)
    producers = [
        threading.Thread(target=send_all, args=(start_worker.broker_url, world.uploads))
        for _ in range(COPIES)
    ]
    started = time.monotonic()
    for producer in producers:
        producer.start()
    victim, held, out_at_kill = kill_mid_run(workers, start_worker.broker_url, len(world.uploads))
    for producer in producers:
        producer.join(timeout=60)
    assert not any(p.is_alive() for p in producers), "a producer is still sending"

    wait_until(
        lambda: settled(start_worker.broker_url, collector, len(world.uploads)),
        timeout=120,
        what="every request answered and every delivery acked",
        every=0.2,
    )
    time.sleep(1.0)  # a late duplicate still shows up
    took = time.monotonic() - started
    tally = world.tally(collector)
    copies = quarantine_copies(world)
    fresh = Counter(str(e["request_id"]) for w in workers for e in events(w, "published")
                    if not e["republished"])  # fmt: skip
    takeovers = sum(len(events(w, "taking over an unfinished action")) for w in workers)
    unfinished = received(victim) - {str(e["request_id"]) for e in events(victim, "published")}

    blocked = {
        rid for rid, results in collector.results.items() if results[0].verdict is Verdict.BLOCK
    }
    # A blocked upload is read twice (the fetch, then the check of its bytes before the
    # source is deleted), any other once. More reads: a delivery worked on it again.
    reads = source_reads(world)
    expected = {u.request_id: 2 if u.request_id in blocked else 1 for u in world.uploads}
    refetched = {rid: reads[rid] - want for rid, want in expected.items() if reads[rid] > want}
    short = [rid for rid, results in collector.results.items() if len(results) < COPIES]

    observe(
        "fault.overlap",
        f"{len(world.uploads)} requests x {COPIES} copies sent at once to {WORKERS} workers; "
        f"one killed holding {len(unfinished)} unfinished deliveries ({held} images in its "
        f"pipeline) with {out_at_kill} results out; all settled "
        f"{took:.0f} s after sending: {tally.words()}; {tally.duplicates + tally.received} "
        f"results published; quarantine copies per blocked upload (count: uploads): "
        f"{_spread(Counter(copies[rid] for rid in blocked))}; source GETs beyond the one "
        f"fetch (and one pre-delete check when blocked): {sum(refetched.values())} on "
        f"{len(refetched)} uploads, {len(set(refetched) & unfinished)} of them held by the "
        f"killed worker; deliveries that worked on a request (count: requests): "
        f"{_spread(Counter(fresh[u.request_id] for u in world.uploads))}; {takeovers} "
        "found the verdict an earlier holder stored when their turn came; "
        f"{len(short)} requests got fewer than {COPIES} copies (a copy the killed worker had "
        "popped but not recorded as unacked, the transport's gap: its request was answered "
        "by another copy, which cleared the producers' record of it)",
        **tally.counts(),
        extra={
            "blocked": tally.blocked,
            "differing": len(tally.differing),
            "refetched_uploads": len(refetched),
            "extra_fetches": sum(refetched.values()),
            "takeovers": takeovers,
            "killed_in_flight": held,
            "killed_unfinished": len(unfinished),
        },
    )
    _assert_one_result_one_action(tally, short, copies, blocked)
    assert out_at_kill < len(world.uploads) * COPIES, "the kill came too late to test anything"
    assert not [rid for rid, n in fresh.items() if n > 1], "worked on by two deliveries"
    assert all(reads[rid] >= want for rid, want in expected.items()), "an upload not read"
    assert set(refetched) <= unfinished, (
        f"fetched again though the killed worker never held it: {set(refetched) - unfinished}"
    )


def _assert_one_result_one_action(
    tally: Tally, short: list[str], copies: Counter[str], blocked: set[str]
) -> None:
    tally.assert_clean()  # every request answered, every copy of its result identical
    # A duplicate copy may vanish in the Redis transport's gap when the killed worker had
    # popped it (the record that would re-send it belongs to the request, answered already);
    # more than the kill could have held in that gap means copies were dropped elsewhere.
    assert len(short) <= 2, f"fewer than {COPIES} results for {short[:5]}"
    assert tally.blocked > 0 and tally.blocked == len(blocked)
    assert {rid: n for rid, n in copies.items() if n != 1 or rid not in blocked} == {}
    assert set(copies) == blocked, f"blocked, not in quarantine: {blocked - set(copies)}"


def _spread(counts: Counter[int]) -> str:
    return ", ".join(f"{n}: {count}" for n, count in sorted(counts.items()))
