"""Queue mode end to end: what a real `modq worker` process delivers, next to its floors.

In one run, over the same mixed-size JPEGs (320-4000 px, `bench/scan.py`'s `make_images`,
in bench/out/scan-images/), with its own redis-server (broker, verdict cache and result
stream) and one `modq worker` process (threads pool, dynamic batcher):

- queue:  N distinct images sent at once through the producer API (`Client.send_many`,
          file:// references, callback redis-stream://bench-results), timed from the first
          send to the last result read from the stream (XREAD). The worker's verdict cache is
          a fresh Redis database, and every result must say `cache.outcome = miss`. Before
          it the worker answers two distinct images per task thread, so that every thread
          has run before the clock starts;
- floor:  `bench.scan.floor`, the same per-image work (read, sha256, draft decode,
          perceptual hashes, preprocess, forward every `--batch` images) in one thread of
          this process, with the same model, precision, batch size and thread count (the
          medians of `--floor-runs` timed runs);
- bare:   `bench.scan.bare`, the forward pass alone at `--batch` on preloaded arrays;
- naive:  the design a typical user writes first (bench/naive_worker.py): one Celery task
          per image that opens the file with PIL and calls a transformers
          `pipeline("image-classification")` on it (for opennsfw, which is ONNX and has no
          pipeline: modq's `Backend.predict([image])`, ONNX at batch 1), run by
          `celery -A bench.naive_worker worker --pool=solo` against the same Redis on its own
          queue, with the same images and references; each task writes its top score to a
          Redis stream, timed first send -> last result read, like the queue;
- exact:  the same N images sent again under new request ids: every one an exact cache hit;
- latency: 30 more distinct images (cache misses), one at a time, each sent only after the
          previous result arrived: p50 and p95 of send -> result read, against the target
          "one forward pass at batch 1 (timed here, same backend) + max_wait_ms + 30 ms".

It prints images per second, the ratios queue/floor (target >= 0.8), queue/bare and
queue/naive (target >= 3 on the ViT-B in bf16), and where the queue's time went: the mean
batch size and forward time the worker itself measured (its Prometheus histograms
`modq_batch_size` and `modq_forward_seconds`, scraped before and after the timed send) and
its CPU use: "worker CPU/image" (user + system time of the worker process and its decoder
processes, from /proc, over the timed cache-miss phase and `--cpu-passes` - 1 more passes
over the same images with the verdict cache emptied), "floor CPU/image" (this process's CPU
time around a floor run made just before each of those passes, while the worker idles: the
host's speed drifts by a fifth over minutes, so each pass is compared with its own floor) and
the median of the passes' ratios (target <= 1.15). Any error result, or a result that is not
the expected cache outcome, aborts.
Hub presets run on random-weight look-alikes (bench/out/lookalikes/, same speed).

    .venv/bin/python -m bench.queue_worker [--model opennsfw|falconsai|adamcodd] [--precision fp32]
                                     [--images 200] [--batch 32] [--max-wait-ms 10]
                                     [--floor-runs 3] [--cpu-passes 3]
"""

# The imports come after the sys.path fix below.
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, only bench/ is on sys.path: the repository root holds `bench.scan` and the
# test helpers this script starts Redis and the worker with.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse
import gc
import os
import platform
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from bench.scan import OUT, bare, floor, lookalike, make_images
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess
from worker.config import Settings
from worker.decode import DecodeLimits, decode
from worker.messages import CacheOutcome, ModerationResult, Status
from worker.models.backend import Backend
from worker.models.precision import load_model
from worker.models.preprocess import draft_size
from worker.queue.client import Client
from worker.storage import file_ref

WORK = OUT / "worker-bench"
STREAM = "bench-results"
NAIVE_STREAM = "bench-naive-results"
NAIVE_TASK = "bench.naive.classify"  # bench/naive_worker.py
NAIVE_QUEUE = "bench-naive"
NAIVE_POOL = "--pool=solo"
LATENCY_REQUESTS = 30
LATENCY_ALLOWANCE_MS = 30.0
NAIVE_WARMUP = 4
#: the worker's CPU per image over the floor's (issue 14)
#: warm-up images sent to the worker before the timed phase, per task thread
WARMUP_ROUNDS = 2
CPU_RATIO_TARGET = 1.15


class BenchError(RuntimeError):
    """Something that makes the figures meaningless: stop and say what."""


# --- reading results back ---------------------------------------------------------------


class StreamReader:
    """Reads one Redis stream from where it last stopped. While timing, entries are only
    collected; they are parsed after the clock stops."""

    def __init__(self, client: redis.Redis, name: str, alive: Callable[[], bool]) -> None:
        self.client = client
        self.name = name
        self.alive = alive
        self.last: bytes | str = "0-0"

    def read(self, want: int, timeout_s: float) -> tuple[list[dict[bytes, bytes]], float]:
        """Block until ``want`` new entries arrived; returns them and the instant
        (perf_counter) the last one was read."""
        got: list[dict[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"only {len(got)} of {want} results on {self.name} in time")
            if not self.alive():
                raise BenchError(f"the worker died; {len(got)} of {want} results arrived")
            block_ms = max(1, int(min(remaining, 1.0) * 1000))
            reply = self.client.xread({self.name: self.last}, count=want - len(got), block=block_ms)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    got.append(fields)
        return got, time.perf_counter()


def parse_results(entries: list[dict[bytes, bytes]]) -> list[ModerationResult]:
    return [ModerationResult.model_validate_json(fields[b"result"]) for fields in entries]


def check_results(
    results: list[ModerationResult], ids: list[str], outcome: CacheOutcome, phase: str
) -> None:
    """Every request answered once, without error, with the cache outcome the phase needs."""
    errors = [r for r in results if r.status is not Status.OK]
    if errors:
        first = errors[0]
        raise BenchError(f"{phase}: {len(errors)} error result(s), e.g. {first.error}")
    if sorted(r.request_id for r in results) != sorted(ids):
        raise BenchError(f"{phase}: the results do not answer the requests one to one")
    wrong = [r for r in results if r.cache is None or r.cache.outcome is not outcome]
    if wrong:
        got = wrong[0].cache.outcome.value if wrong[0].cache else "none"
        raise BenchError(f"{phase}: {len(wrong)} result(s) not `{outcome.value}` (e.g. {got})")


# --- the worker's own measurements ----------------------------------------------------------


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass(frozen=True)
class WorkerCounters:
    batches: float
    images: float
    forward_s: float
    cpu_s: float | None  # user + system CPU time of the worker process
    #: the same for the worker and every process under it (its decoder processes), live or
    #: reaped; the part that is not ``cpu_s`` is the decoders'
    tree_cpu_s: float | None = None

    def __sub__(self, other: WorkerCounters) -> WorkerCounters:
        return WorkerCounters(
            self.batches - other.batches,
            self.images - other.images,
            self.forward_s - other.forward_s,
            _minus(self.cpu_s, other.cpu_s),
            _minus(self.tree_cpu_s, other.tree_cpu_s),
        )


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (field 3, the state, comes first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its threads, where /proc exists."""
    fields = _stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and of every process under it, where /proc
    exists: each live one's own time, plus the time of the children each has reaped (a
    decoder the pool replaced mid-phase counts in its parent's cutime once waited for). The
    difference between two readings is the tree's CPU time in between."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    ticks = 0
    for member in tree:
        fields = _stat(member)
        if fields is None:
            if member == pid:
                return None
            continue  # gone since the walk: its time is in its parent's cutime
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def scrape(worker: WorkerProcess) -> WorkerCounters:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(worker.metrics()):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    assert worker.process is not None
    return WorkerCounters(
        values.get("modq_batch_size_count", 0.0),
        values.get("modq_batch_size_sum", 0.0),
        values.get("modq_forward_seconds_sum", 0.0),
        process_cpu_seconds(worker.process.pid),
        tree_cpu_seconds(worker.process.pid),
    )


# --- the in-process references --------------------------------------------------------------


def forward_batch1_ms(backend: Backend, path: Path, limits: DecodeLimits) -> float:
    """Median time of one forward pass at batch 1 (the model alone)."""
    frame = decode(path.read_bytes(), limits, draft_size(backend.card)).frames[0]
    one = backend.preprocess(frame)[None]
    for _ in range(3):
        backend.forward(one)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 10 or time.perf_counter() - started < 2.0:
        t0 = time.perf_counter()
        backend.forward(one)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# --- the two workers ------------------------------------------------------------------------


def modq_worker_env(
    args: argparse.Namespace, spec: str, broker: str, cache: str, threads: int, images: Path
) -> dict[str, str]:
    return {
        "MODQ_BROKER_URL": broker,
        "MODQ_CACHE_URL": cache,
        "MODQ_ALLOWED_ROOTS": str(images),
        "MODQ_MODEL": spec,
        "MODQ_DEVICE": "cpu",
        "MODQ_PRECISION": args.precision,
        "MODQ_MAX_BATCH_SIZE": str(args.batch),
        "MODQ_MAX_WAIT_MS": str(args.max_wait_ms),
        "MODQ_THREADS": str(threads),
        "MODQ_CACHE_DIR": str(WORK / "modq-cache"),
        "HF_HUB_OFFLINE": "1",
    }


class NaiveWorker:
    """`celery -A bench.naive_worker worker --pool=solo` in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MODQ_", "NAIVE_"))},
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        celery = Path(sys.executable).with_name("celery")
        return [
            str(celery), "-A", "bench.naive_worker", "worker", NAIVE_POOL,
            "-Q", NAIVE_QUEUE, "--loglevel=INFO", "--hostname=naive@%h",
        ]  # fmt: skip

    def start(self, timeout_s: float = 120.0) -> NaiveWorker:
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while "ready." not in self.log():
            if not self.alive() or time.monotonic() > deadline:
                raise BenchError(f"the naive worker did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


# --- phases -----------------------------------------------------------------------------------


def send_and_collect(
    client: Client, reader: StreamReader, paths: list[Path], timeout_s: float
) -> tuple[list[str], list[dict[bytes, bytes]], float]:
    """Send one request per path at once; (request ids, raw results, seconds first send ->
    last result read)."""
    ids = [uuid.uuid4().hex for _ in paths]
    refs = [file_ref(p) for p in paths]
    started = time.perf_counter()
    requests = (
        client.request(ref, request_id=rid, callback=f"redis-stream://{STREAM}")
        for ref, rid in zip(refs, ids, strict=True)
    )
    for _ in client.send_many(requests):
        pass
    entries, finished = reader.read(len(paths), timeout_s)
    return ids, entries, finished - started


def send_naive(
    app: Celery, reader: StreamReader, paths: list[Path], timeout_s: float
) -> tuple[list[str], float]:
    ids = [uuid.uuid4().hex for _ in paths]
    refs = [file_ref(p) for p in paths]
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for ref, rid in zip(refs, ids, strict=True):
            app.send_task(
                NAIVE_TASK, args=[ref, rid], queue=NAIVE_QUEUE, task_id=rid, producer=producer
            )
    entries, finished = reader.read(len(paths), timeout_s)
    answered = sorted(fields[b"request_id"].decode() for fields in entries)
    if answered != sorted(ids):
        raise BenchError("naive: the results do not answer the requests one to one")
    return ids, finished - started


def latencies(
    client: Client, reader: StreamReader, paths: list[Path]
) -> list[tuple[float, ModerationResult]]:
    """One request at a time: send, wait for its result, then the next; (ms, result) each."""
    out: list[tuple[float, ModerationResult]] = []
    for path in paths:
        ids, entries, seconds = send_and_collect(client, reader, [path], 60.0)
        results = parse_results(entries)
        check_results(results, ids, CacheOutcome.MISS, "latency")
        out.append((seconds * 1000, results[0]))
    return out


@dataclass
class Figures:
    queue_ips: float = 0.0
    floor_ips: float = 0.0
    bare_ips: float = 0.0
    naive_ips: float = 0.0
    exact_ips: float = 0.0
    forward1_ms: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    worker: WorkerCounters | None = None
    cpu_passes: list[WorkerCounters] = field(default_factory=list)  # the first is `worker`
    queue_s: float = 0.0
    decode_ms: float = 0.0  # mean per image, from the results' timings (decode+hash+prep)
    queue_wait_ms: float = 0.0  # mean per image waiting in the batcher
    floor_cpu_ms: float = 0.0  # CPU time (all threads) per image of the floor (median)
    floor_runs: list[float] = field(default_factory=list)  # img/s of each floor run
    floor_cpu_runs: list[float] = field(default_factory=list)  # CPU ms/image of each
    #: CPU ms/image of the floor run just before each of `cpu_passes` (the worker idle)
    paired_floor_cpu: list[float] = field(default_factory=list)
    naive_cpu_ms: float | None = None  # and of the naive worker process
    # low load, ms per request for each part: the worker's own timings, and the rest
    low_load: dict[str, list[float]] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def low_load_breakdown(timed: list[tuple[float, ModerationResult]]) -> dict[str, list[float]]:
    """Each part of one request's latency, in ms: fetch, decode (+ cache lookups, hashing,
    preprocessing), batcher wait, forward, the pipeline's total, and what lies outside it
    (broker, Celery, result store, publishing, reading the stream)."""
    parts: dict[str, list[float]] = {}
    for ms, result in timed:
        t = result.timings
        if t is None:
            continue
        for name, value in (
            ("fetch", t.fetch_ms),
            ("decode", t.decode_ms),
            ("wait", t.queue_ms),
            ("forward", t.infer_ms),
            ("worker", t.total_ms),
            ("outside", ms - t.total_ms),
        ):
            parts.setdefault(name, []).append(value)
    return parts


# --- main -------------------------------------------------------------------------------------


def task_threads(args: argparse.Namespace) -> int:
    """The worker's task threads: MODQ_CONCURRENCY unset, twice the batch size."""
    return 2 * args.batch


def naive_design(model: str) -> str:
    if model == "opennsfw":
        return "modq Backend.predict([image]) (ONNX at batch 1; opennsfw has no pipeline)"
    return "transformers pipeline('image-classification') (batch 1)"


def run(args: argparse.Namespace, threads: int, out: Figures) -> None:
    """Every phase, in order; starts and stops every process it needs."""
    spec = lookalike(args.model)
    # The worker's warm-up: twice as many distinct images as it has task threads, so that
    # every thread (and the allocator arena it draws from) has run images before the clock
    # starts. After a warm-up of one batch, the first timed pass paid for first use in half
    # the threads: about 5 ms of CPU per image more than after this warm-up (issue 14).
    warm = WARMUP_ROUNDS * task_threads(args)
    paths = make_images(args.images + warm + LATENCY_REQUESTS, OUT / "scan-images")
    measured = paths[: args.images]
    warmup = paths[args.images : args.images + warm]
    low_load = paths[args.images + warm :]
    limits = DecodeLimits()

    # 1. The in-process references, before any worker runs (nothing else on the cores).
    backend = load_model(spec, device="cpu", precision=args.precision, threads=threads)
    floor(backend, warmup[: args.batch], args.batch, limits)
    # The floor's CPU time swings by a tenth from run to run on a shared machine (its two
    # inference threads wake and sleep with the load): the median of a few runs.
    for _ in range(args.floor_runs):
        cpu_started = time.process_time()
        out.floor_runs.append(floor(backend, measured, args.batch, limits))
        out.floor_cpu_runs.append(1000 * (time.process_time() - cpu_started) / len(measured))
    out.floor_ips = statistics.median(out.floor_runs)
    out.floor_cpu_ms = statistics.median(out.floor_cpu_runs)
    out.bare_ips = bare(backend, measured, args.batch, limits)
    out.forward1_ms = forward_batch1_ms(backend, measured[0], limits)

    def paired_floor(backend: Backend) -> None:
        """A floor run just before a worker pass, while the worker idles: the two see the
        same machine (its speed drifts by a fifth over minutes on a shared host)."""
        gc.collect()
        cpu_started = time.process_time()
        floor(backend, measured, args.batch, limits)
        out.paired_floor_cpu.append(1000 * (time.process_time() - cpu_started) / len(measured))

    with ExitStack() as stack:
        server = RedisServer(WORK / "redis").start()
        stack.callback(server.stop)
        broker = f"redis://127.0.0.1:{server.port}/0"
        cache = f"redis://127.0.0.1:{server.port}/1"
        results_db = redis.Redis.from_url(broker)
        if redis.Redis.from_url(cache).dbsize():
            raise BenchError("the verdict cache database is not empty")

        # 2. modq's worker: misses, exact hits, latency at low load.
        log = WORK / "modq-worker.log"
        log.unlink(missing_ok=True)
        env = modq_worker_env(args, spec, broker, cache, threads, measured[0].parent)
        worker = WorkerProcess(env, log)
        stack.callback(worker.stop)
        worker.start(timeout=300)

        def worker_alive() -> bool:
            return worker.process is not None and worker.process.poll() is None

        reader = StreamReader(results_db, STREAM, worker_alive)
        timeout = 60.0 + 5.0 * args.images
        with Client(Settings(broker_url=broker)) as client:
            ids, entries, _ = send_and_collect(client, reader, warmup, timeout)
            check_results(parse_results(entries), ids, CacheOutcome.MISS, "warm-up")

            paired_floor(backend)
            before = scrape(worker)
            ids, entries, out.queue_s = send_and_collect(client, reader, measured, timeout)
            out.worker = scrape(worker) - before
            results = parse_results(entries)
            check_results(results, ids, CacheOutcome.MISS, "cache misses")
            out.queue_ips = len(measured) / out.queue_s
            out.decode_ms = statistics.mean(r.timings.decode_ms for r in results if r.timings)
            out.queue_wait_ms = statistics.mean(r.timings.queue_ms for r in results if r.timings)
            out.cpu_passes.append(out.worker)
            # The CPU per image again over the same images, the verdict cache emptied first
            # (every one a miss again): one pass swings by a fifth on a shared machine.
            for _ in range(args.cpu_passes - 1):
                redis.Redis.from_url(cache).flushdb()
                paired_floor(backend)
                before = scrape(worker)
                ids, entries, _ = send_and_collect(client, reader, measured, timeout)
                out.cpu_passes.append(scrape(worker) - before)
                check_results(parse_results(entries), ids, CacheOutcome.MISS, "CPU passes")

            ids, entries, seconds = send_and_collect(client, reader, measured, timeout)
            check_results(parse_results(entries), ids, CacheOutcome.EXACT, "exact hits")
            out.exact_ips = len(measured) / seconds

            timed = latencies(client, reader, low_load)
            times = [ms for ms, _ in timed]
            out.p50_ms, out.p95_ms = percentile(times, 50), percentile(times, 95)
            out.low_load = low_load_breakdown(timed)
        worker.stop()
        del backend
        gc.collect()

        # 3. The naive design: one task per image, its own worker process and queue.
        naive_env = {
            "NAIVE_BROKER_URL": broker,
            "NAIVE_MODEL": spec,
            "NAIVE_PRECISION": args.precision,
            "NAIVE_THREADS": str(threads),
            "NAIVE_STREAM": NAIVE_STREAM,
        }
        naive = NaiveWorker(naive_env, WORK / "naive-worker.log")
        stack.callback(naive.stop)
        naive.start()
        naive_reader = StreamReader(results_db, NAIVE_STREAM, naive.alive)
        app = Celery("bench-producer", broker=broker)
        stack.callback(app.close)
        naive_timeout = 120.0 + 10.0 * args.images
        send_naive(app, naive_reader, warmup[:NAIVE_WARMUP], naive_timeout)
        assert naive.process is not None
        cpu_before = process_cpu_seconds(naive.process.pid)
        _, seconds = send_naive(app, naive_reader, measured, naive_timeout)
        cpu_after = process_cpu_seconds(naive.process.pid)
        out.naive_ips = len(measured) / seconds
        if cpu_before is not None and cpu_after is not None:
            out.naive_cpu_ms = 1000 * (cpu_after - cpu_before) / len(measured)
        naive.stop()


def worker_cpu_report(args: argparse.Namespace, fig: Figures) -> float | None:
    """The CPU each image cost the worker (its process and its decoder processes, user +
    system, over each timed cache-miss pass) next to the floor's (this process, over the
    floor run just before that pass); returns the median of the passes' ratios."""
    trees = [p.tree_cpu_s for p in fig.cpu_passes if p.tree_cpu_s is not None]
    owns = [p.cpu_s for p in fig.cpu_passes if p.cpu_s is not None]
    floors = fig.paired_floor_cpu
    if not trees or len(owns) != len(trees) or len(floors) != len(trees):
        return None
    passes = [1000 * t / args.images for t in trees]
    ratios = [ms / floor_ms for ms, floor_ms in zip(passes, floors, strict=True)]
    own_ms = 1000 * statistics.median(owns) / args.images
    worker_ms = statistics.median(passes)
    print("\nCPU per image, cache misses (user + system; timed phases only):")
    print(
        f"  {'worker CPU/image':18} {worker_ms:6.1f} ms  (median of {len(passes)} passes: "
        f"{', '.join(f'{ms:.1f}' for ms in passes)}; worker process {own_ms:.1f} ms + "
        f"decoder processes {worker_ms - own_ms:.1f} ms)"
    )
    print(
        f"  {'floor CPU/image':18} {statistics.median(floors):6.1f} ms  (bench.scan.floor, this "
        f"process, just before each pass: {', '.join(f'{ms:.1f}' for ms in floors)})"
    )
    ratio = statistics.median(ratios)
    print(
        f"  {'ratio':18} {ratio:6.2f}   (median of the passes' own: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; target <= {CPU_RATIO_TARGET:.2f})"
    )
    return ratio


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(args: argparse.Namespace, fig: Figures) -> None:
    target_ms = fig.forward1_ms + args.max_wait_ms + LATENCY_ALLOWANCE_MS
    rows = [
        ("queue, cache misses", f"{fig.queue_ips:.1f} img/s"),
        ("floor (bench.scan.floor)", f"{fig.floor_ips:.1f} img/s"),
        ("bare (bench.scan.bare)", f"{fig.bare_ips:.1f} img/s"),
        ("naive, one task per image", f"{fig.naive_ips:.1f} img/s"),
        ("queue, exact cache hits", f"{fig.exact_ips:.1f} img/s"),
        ("latency p50 / p95, low load", f"{fig.p50_ms:.0f} / {fig.p95_ms:.0f} ms"),
        ("forward pass at batch 1", f"{fig.forward1_ms:.0f} ms"),
        ("bare at batch 1 (1 / forward)", f"{1000 / fig.forward1_ms:.1f} img/s"),
        ("queue / floor", f"{fig.queue_ips / fig.floor_ips:.2f}"),
        ("queue / bare", f"{fig.queue_ips / fig.bare_ips:.2f}"),
        ("queue / naive", f"{fig.queue_ips / fig.naive_ips:.2f}"),
        ("bare / naive", f"{fig.bare_ips / fig.naive_ips:.2f}"),
    ]
    print(f"{'figure':32} value")
    for name, value in rows:
        print(f"{name:32} {value}")

    w = fig.worker
    if w is not None and w.batches:
        cpu = "" if w.cpu_s is None else f"; worker CPU {w.cpu_s / fig.queue_s:.2f} cores busy"
        print("\nwhere the queue's time went, cache misses (worker metrics, this phase only):")
        print(
            f"  {w.batches:.0f} forward passes, mean batch {w.images / w.batches:.1f}; "
            f"forward busy {w.forward_s:.1f} s of {fig.queue_s:.1f} s wall "
            f"({w.forward_s / fig.queue_s:.0%})"
        )
        print(
            f"  forward per image {1000 * w.forward_s / w.images:.1f} ms in the worker, "
            f"{1000 / fig.bare_ips:.1f} ms bare{cpu}"
        )
        if w.cpu_s is not None:
            naive = "" if fig.naive_cpu_ms is None else f", {fig.naive_cpu_ms:.1f} ms naive"
            print(
                f"  CPU per image: {1000 * w.cpu_s / args.images:.1f} ms in the worker, "
                f"{fig.floor_cpu_ms:.1f} ms in the floor{naive}"
            )
        print(
            f"  per image, mean wall time: decode+hash+preprocess {fig.decode_ms:.0f} ms "
            f"(task threads share the cores), batcher wait {fig.queue_wait_ms:.0f} ms"
        )
    cpu_ratio = worker_cpu_report(args, fig)
    if fig.low_load:
        parts = ", ".join(
            f"{name} {percentile(ms, 50):.0f}/{percentile(ms, 95):.0f}"
            for name, ms in fig.low_load.items()
        )
        print(f"low load, ms per request, p50/p95 of each part: {parts}")

    print("\ntargets")
    print(
        f"  queue / floor >= 0.8: {fig.queue_ips / fig.floor_ips:.2f} "
        f"{verdict(fig.queue_ips >= 0.8 * fig.floor_ips)}"
    )
    if cpu_ratio is not None:
        print(
            f"  worker CPU/image / floor CPU/image <= {CPU_RATIO_TARGET:.2f}: {cpu_ratio:.2f} "
            f"{verdict(cpu_ratio <= CPU_RATIO_TARGET)}"
        )
    ratio = fig.queue_ips / fig.naive_ips
    scope = "" if args.model != "opennsfw" else " (the target is set for the ViT-B)"
    print(f"  queue / naive >= 3: {ratio:.2f} {verdict(ratio >= 3)}{scope}")
    print(
        f"  latency p50 <= forward@1 + max_wait + {LATENCY_ALLOWANCE_MS:.0f} ms = "
        f"{target_ms:.0f} ms: p50 {fig.p50_ms:.0f} ms {verdict(fig.p50_ms <= target_ms)} "
        f"(p95 {fig.p95_ms:.0f} ms {verdict(fig.p95_ms <= target_ms)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--model", default="opennsfw", choices=("opennsfw", "falconsai", "adamcodd")
    )
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="MODQ_MAX_BATCH_SIZE")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="MODQ_MAX_WAIT_MS")
    parser.add_argument("--threads", type=int, default=0, help="inference threads; 0 = cores")
    parser.add_argument(
        "--floor-runs", type=int, default=3, help="timed floor runs (their medians are used)"
    )
    parser.add_argument(
        "--cpu-passes",
        type=int,
        default=3,
        help="timed cache-miss passes for the worker's CPU per image (the median is used)",
    )
    args = parser.parse_args()
    threads = args.threads or (os.cpu_count() or 1)

    import celery
    import onnxruntime
    import torch

    load = f" load={os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(
        f"# {platform.machine()} cores={os.cpu_count()} torch={torch.__version__} "
        f"onnxruntime={onnxruntime.__version__} celery={celery.__version__}{load}"
    )
    model = args.model if args.model == "opennsfw" else f"{args.model} (look-alike)"
    print(
        f"# {model} {args.precision}; {args.images} JPEGs 320-4000 px; batch {args.batch}; "
        f"max_wait {args.max_wait_ms:g} ms; {threads} inference threads everywhere"
    )
    print(
        f"# queue: `modq worker` (threads pool, {task_threads(args)} task threads, warmed up "
        f"with {WARMUP_ROUNDS * task_threads(args)} images); naive: "
        f"`celery -A bench.naive_worker worker {NAIVE_POOL}`, one task per image, "
        f"{naive_design(args.model)}\n",
        flush=True,
    )
    fig = Figures()
    try:
        run(args, threads, fig)
    except BenchError as exc:
        raise SystemExit(f"bench aborted: {exc}") from exc
    report(args, fig)


if __name__ == "__main__":
    main()
