"""Redis round trips per moderation request in the queue worker, counted, not timed.

Starts its own redis-server on a free port, builds the worker's service through
``worker.runtime.build_runtime`` (the fake model: the model does not touch Redis), and
handles N requests of each case one after another through ``ModerationService.handle``:

- miss:        images never seen (an empty neighbourhood in the perceptual index);
- near-miss:   a re-encoded copy of each: a perceptual candidate that is read, not reused;
- exact:       the same bytes under new request ids (exact cache hits);
- redelivery:  the first requests again (the stored result is republished).

It prints, per request, the client's round trips (a command, a pipeline or a script call is
one) and the commands Redis ran (``INFO commandstats``; a pipeline's MULTI/EXEC and a
script's inner commands count too). No callback is named, so no publication is counted: a
``redis-stream://`` callback adds one XADD on the stream Redis.

    .venv/bin/python -m bench.redis_trips [--requests 20]
"""

# The imports come after the sys.path fix below.
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse
import tempfile
from collections.abc import Callable

import redis

from tests.support.redis_server import RedisServer
from tests.support.redis_trips import Cases, TripCounter, measure, queue_runtime
from worker.queue.service import Handled

CASES = ("miss", "near-miss", "exact", "redelivery")
#: the cache outcome each case must report (a redelivery republishes the miss's result)
OUTCOMES = {"miss": "miss", "near-miss": "miss", "exact": "exact", "redelivery": "miss"}


def _checker(case: str) -> Callable[[Handled], None]:
    def check(handled: Handled) -> None:
        cache = handled.result.cache
        outcome = cache.outcome.value if cache else None
        if outcome != OUTCOMES[case] or handled.republished != (case == "redelivery"):
            raise SystemExit(f"{case}: {handled.result.request_id} came out {outcome}")

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="requests of each case")
    args = parser.parse_args()
    cases = Cases.build(args.requests + 1)
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        client = redis.Redis(port=server.port, db=0, decode_responses=True)
        counter = TripCounter()
        with queue_runtime(f"redis://127.0.0.1:{server.port}/0", cases.store) as runtime:
            service = runtime.service
            assert service is not None
            # The last image of each case warms up: connections, script loads.
            for case in CASES:
                measure(service, cases.requests(case)[-1:], counter, client, _checker(case))
            print(f"{'case':<12} {'round trips':>11} {'commands':>9}  commands by name")
            for case in CASES:
                requests = cases.requests(case)[:-1]
                trips = measure(service, requests, counter, client, _checker(case))
                names = ", ".join(f"{k} {v:g}" for k, v in trips.by_command.items())
                print(f"{case:<12} {trips.round_trips:>11.2f} {trips.commands:>9.2f}  {names}")
        client.close()


if __name__ == "__main__":
    main()
