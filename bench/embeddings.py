"""What embeddings and similarity search cost.

1. Embedding overhead: the scan pipeline (as `modq scan` builds it, cache off) over the same
   JPEGs with and without an embedding sink (every embedding written to JSONL shards), in
   alternating rounds of one run; prints images per second of each and the ratio
   with ÷ without (target >= 0.95: the embedding comes from the same forward pass).
2. Similarity query latency: an index (faiss HNSW, cosine, the defaults of `modq index build`)
   of ``--vectors`` clustered vectors of the model's embedding width; prints build time,
   p50/p95/p99 of one `VectorIndex.search(k=10)` and recall@10 against brute force.

    .venv/bin/python bench/embeddings.py [--model opennsfw] [--images 200] [--rounds 3]
                                         [--vectors 100000]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, only bench/ is on sys.path: the repository root holds `bench.scan`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from bench.scan import OUT, make_images
from worker.actions import Actions
from worker.embeddings import EmbeddingRecord, ShardSink
from worker.models.backend import Backend
from worker.models.precision import load_model
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.similarity import VectorIndex
from worker.storage import LocalStore, file_ref
from worker.storage.folders import LocalFolder


def scan_rate(backend: Backend, paths: list[Path], batch: int, sink_dir: Path | None) -> float:
    store = LocalStore([paths[0].parent])
    options = PipelineOptions(max_batch_size=batch)
    sink = None if sink_dir is None else ShardSink(LocalFolder(sink_dir), "jsonl")
    concurrency = max(4, min(2 * batch, batch + 2 * (os.cpu_count() or 1)))  # as run_scan
    policy = Policy("bench", 0.5, 0.9)
    started = time.perf_counter()
    actions = Actions(sink=sink)
    with Pipeline(backend, store, policy, actions=actions, options=options) as pipeline:
        results = list(pipeline.process_many(map(file_ref, paths), concurrency))
    seconds = time.perf_counter() - started  # includes writing the last shard at close
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return len(paths) / seconds


def overhead(backend: Backend, paths: list[Path], batch: int, rounds: int) -> None:
    scan_rate(backend, paths[:batch], batch, None)  # warm up
    without, with_sink = [], []
    for _ in range(rounds):
        without.append(scan_rate(backend, paths, batch, None))
        with tempfile.TemporaryDirectory() as folder:
            with_sink.append(scan_rate(backend, paths, batch, Path(folder)))
            written = sum(1 for p in Path(folder).iterdir() if p.suffix == ".jsonl")
            assert written, "the sink wrote no shard"
    a, b = float(np.median(without)), float(np.median(with_sink))
    print(f"scan without embeddings: {a:7.1f} images/s (median of {rounds})")
    print(f"scan with embedding sink: {b:7.1f} images/s (median of {rounds})")
    print(f"ratio with / without: {b / a:.3f}  (target >= 0.95)")


def latency(dim: int, count: int, queries: int = 1000) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(10, count // 200), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), count)]
    vectors += rng.normal(scale=0.5, size=vectors.shape).astype(np.float32)
    records = (
        EmbeddingRecord(f"r{i}", f"file:///{i}.jpg", f"{i:064x}", "m", "1", "allow", 0.0, v)
        for i, v in enumerate(vectors)
    )
    started = time.perf_counter()
    index = VectorIndex.build(records)
    built = time.perf_counter() - started
    probes = vectors[rng.choice(count, queries, replace=False)]
    probes = probes + rng.normal(scale=0.2, size=probes.shape).astype(np.float32)
    index.search(probes[0], 10)
    times = []
    for probe in probes:
        t = time.perf_counter()
        index.search(probe, 10)
        times.append((time.perf_counter() - t) * 1000)
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    sample = probes[:200]
    ann, exact = index.search_many(sample, 10), index.search_many(sample, 10, exact=True)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann, exact, strict=True)])
    print(f"index of {count:,} x {dim}-d vectors built in {built:.1f} s")
    print(f"query k=10: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms ({queries} queries)")
    print(f"recall@10 against brute force: {recall:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="opennsfw")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vectors", type=int, default=100_000)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    backend = load_model(args.model, "auto", "auto", 0, OUT / "onnx")
    print(f"model: {backend.describe()}")
    paths = make_images(args.images, OUT / "scan-images")
    overhead(backend, paths, args.batch, args.rounds)
    latency(backend.card.embedding_dim or 768, args.vectors)


if __name__ == "__main__":
    main()
