"""What the record of pending requests costs a producer on a Redis broker.

In one run, against its own redis-server (append-only, fsync always, as the README asks of a
broker), the same N requests are sent through `Client.send_many` twice per round, once with
the record (the default) and once without (`MODQ_PENDING_SWEEP_S=0`), alternating over
`--rounds` rounds; it prints requests per second for each and the ratio with ÷ without.
Then it times one sweep over a queue holding the backlog (`Sweeper.sweep`), which every
worker holding the lock runs once per `MODQ_PENDING_SWEEP_S`.

    .venv/bin/python -m bench.producer [--requests 5000] [--rounds 3]
"""

# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import statistics
import tempfile
import time

from tests.support.redis_server import RedisServer
from worker.config import Settings
from worker.queue.client import Client
from worker.queue.sweep import Sweeper


def send(broker: str, requests: int, record: bool, tag: str) -> float:
    settings = Settings(broker_url=broker, pending_sweep_s=30.0 if record else 0.0)
    with Client(settings) as client:
        batch = [
            client.request(f"s3://uploads/{tag}/{i}.jpg", callback="redis-stream://results")
            for i in range(requests)
        ]
        started = time.perf_counter()
        for _ in client.send_many(batch):
            pass
        return requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder), durable=True) as server:
        broker = f"redis://127.0.0.1:{server.port}/0"
        with_record, without = [], []
        for round_ in range(args.rounds):
            with_record.append(send(broker, args.requests, True, f"r{round_}"))
            without.append(send(broker, args.requests, False, f"n{round_}"))
        backlog = args.requests * args.rounds * 2
        with Client(Settings(broker_url=broker)) as client:
            assert client.pending is not None
            sweeper = Sweeper(client.pending, lambda *_: None, 30.0)
            started = time.perf_counter()
            report = sweeper.sweep()
            sweep_ms = (time.perf_counter() - started) * 1000
            recorded = client.pending.count()
            sweeper.stop()
    w, n = statistics.median(with_record), statistics.median(without)
    print(f"requests per round: {args.requests}, rounds: {args.rounds} (medians)")
    print(f"send with the record:    {w:8.0f} requests/s")
    print(f"send without the record: {n:8.0f} requests/s")
    print(f"ratio with / without:    {w / n:8.2f}")
    print(
        f"one sweep over a queue of {backlog} messages, {recorded} recorded: {sweep_ms:.1f} ms "
        f"({report.checked} candidates)"
    )


if __name__ == "__main__":
    main()
