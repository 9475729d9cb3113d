"""Hash-bank match latency at scale, on a redis-server the bench starts itself.

Loads ``--hashes`` random PDQ hashes (default 1,000,000) into one bank with
``RedisBankStore.add`` (the path `modq bank add` takes), then times ``RedisBankStore.match``
over ``--queries`` queries (default 2,000), one at a time after a short warm-up: half are
near-misses of stored hashes (10 to 31 random bits flipped, which must all be found at exactly
that distance), half are random hashes (no match). Prints the load time, the memory Redis
gained, and match latency p50 / p95 / p99, overall and per kind. Target: p95 <= 5 ms.

``--compare-sets`` also loads the same hashes into the layout the store does not use (one Redis
set per index key, raw hashes as members) and times its candidate fetch (SUNION) plus the same
distance check, to show why the store keeps append-only strings.

    .venv/bin/python -m bench.banks [--hashes 1000000] [--queries 2000] [--compare-sets]
"""

# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np
import redis

from tests.support.redis_server import RedisServer
from worker.banks import RedisBankStore
from worker.banks.redis import _closest as closest
from worker.hashing.pdq import HASH_BITS
from worker.hashing.pdq_index import CHUNKS, probes

BANK = "bench"
SEED = 20240601
WARMUP = 50


def random_rows(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (count, HASH_BITS // 8), dtype=np.uint8)


def make_queries(rows: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(hex, expected distance or -1): near-misses and random hashes, interleaved."""
    queries: list[tuple[str, int]] = []
    for i in range(count):
        if i % 2:
            queries.append((random_rows(1, rng)[0].tobytes().hex(), -1))
            continue
        value = int.from_bytes(rows[rng.integers(len(rows))].tobytes(), "big")
        distance = int(rng.integers(10, 32))
        for bit in rng.choice(HASH_BITS, size=distance, replace=False):
            value ^= 1 << int(bit)
        queries.append((format(value, "064x"), distance))
    return queries


def percentiles(samples: list[float]) -> str:
    p50, p95, p99 = np.percentile(np.array(samples) * 1000, [50, 95, 99])
    return f"p50 {p50:5.2f}  p95 {p95:5.2f}  p99 {p99:5.2f} ms"


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def time_matches(
    match: Callable[[str], int | None], queries: list[tuple[str, int]]
) -> tuple[dict[str, list[float]], int, float]:
    """Latency per kind, how many near-misses came back at the wrong distance, and this
    process's CPU time per match (wall time minus CPU is waiting: Redis, or the scheduler)."""
    for hex_hash, _ in queries[:WARMUP]:
        match(hex_hash)
    times: dict[str, list[float]] = {"near": [], "random": []}
    wrong = 0
    cpu_started = time.process_time()
    for hex_hash, expected in queries:
        started = time.perf_counter()
        distance = match(hex_hash)
        times["near" if expected >= 0 else "random"].append(time.perf_counter() - started)
        wrong += distance != (expected if expected >= 0 else None)
    return times, wrong, (time.process_time() - cpu_started) / len(queries)


def report(
    title: str, timed: tuple[dict[str, list[float]], int, float], client: redis.Redis, command: str
) -> None:
    times, wrong, cpu_s = timed
    everything = times["near"] + times["random"]
    print(f"{title}")
    print(f"  all {len(everything):>5} queries  {percentiles(everything)}")
    for kind, samples in times.items():
        print(f"  {kind:>6} {len(samples):>5}      {percentiles(samples)}")
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    print(
        f"  CPU per match in this process {cpu_s * 1000:.2f} ms; Redis per {command.upper()} "
        f"{float(stats.get('usec_per_call', 0)) / 1000:.2f} ms; load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"  near-misses found at the right distance: {len(times['near']) - wrong} of "
        f"{len(times['near'])}" + ("" if wrong == 0 else "  <-- WRONG")
    )


def bench_store(url: str, rows: np.ndarray, queries: list[tuple[str, int]]) -> None:
    client = redis.Redis.from_url(url)
    before = used_memory(client)
    hexes = [row.tobytes().hex() for row in rows]
    store = RedisBankStore(url, prefix="bench", timeout_s=30.0)
    started = time.perf_counter()
    added = store.add(BANK, hexes, "bench")
    load_s = time.perf_counter() - started
    gained = used_memory(client) - before
    print(
        f"loaded {added:,} hashes in {load_s:.1f} s ({added / load_s:,.0f} hashes/s); "
        f"Redis memory +{gained / 2**20:,.0f} MiB ({gained / max(added, 1):,.0f} B/hash)"
    )

    def match(hex_hash: str) -> int | None:
        found = store.match(hex_hash)
        return None if found is None else found.distance

    client.config_resetstat()
    timed = time_matches(match, queries)
    title = "RedisBankStore.match, default distance 31 (272 probes, one round trip)"
    report(title, timed, client, "mget")
    store.close()
    client.close()


def bench_sets(url: str, rows: np.ndarray, queries: list[tuple[str, int]]) -> None:
    """The same index as sets: one SADD per key (grouped like the store's APPENDs)."""
    client = redis.Redis.from_url(url)
    before = used_memory(client)
    chunks = rows.view(">u2")
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for index in range(CHUNKS):
        order = np.argsort(chunks[:, index], kind="stable")
        values = chunks[order, index]
        cuts = (np.flatnonzero(np.diff(values)) + 1).tolist()
        for start, end in zip([0, *cuts], [*cuts, len(order)], strict=True):
            members = [rows[j].tobytes() for j in order[start:end].tolist()]
            pipe.sadd(f"sets:{index}:{int(values[start]):04x}", *members)
            if len(pipe.command_stack) >= 2000:
                pipe.execute()
    pipe.execute()
    load_s = time.perf_counter() - started
    gained = used_memory(client) - before
    print(f"\nsets layout: loaded in {load_s:.1f} s; Redis memory +{gained / 2**20:,.0f} MiB")

    def match(hex_hash: str) -> int | None:
        keys = [f"sets:{i}:{c:04x}" for i, c in probes(int(hex_hash, 16), 31)]
        members = client.sunion(keys)
        query = np.frombuffer(bytes.fromhex(hex_hash), dtype=np.uint64)
        hit = closest(list(members), query)  # the store's own distance check
        return hit[0] if hit is not None and hit[0] <= 31 else None

    client.config_resetstat()
    timed = time_matches(match, queries)
    report("sets layout: SUNION of the 272 probe keys + the same check", timed, client, "sunion")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--compare-sets", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    rows = random_rows(args.hashes, rng)
    queries = make_queries(rows, args.queries, rng)
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        version = redis.Redis(port=server.port).info("server")["redis_version"]
        print(
            f"# {platform.machine()} cores={os.cpu_count()} redis-server {version} "
            f"(--save '', no persistence) redis-py {redis.__version__} "
            f"load={os.getloadavg()[0]:.2f}"
        )
        print(
            f"# {args.hashes:,} random PDQ hashes in one bank; {args.queries:,} queries, "
            f"half near-misses at distance 10-31, half random"
        )
        bench_store(f"redis://127.0.0.1:{server.port}/0", rows, queries)
        if args.compare_sets:
            bench_sets(f"redis://127.0.0.1:{server.port}/1", rows, queries)


if __name__ == "__main__":
    main()
