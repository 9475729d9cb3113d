"""Run ``decode()`` on hostile input in a child process that cannot take the test run with it.

Why a child process: a hang inside Pillow's C code never returns to Python, so no in-process
timeout can stop it, and an unbounded allocation either succeeds (the test passes, having used
20 GB) or takes pytest down. The child runs under ``RLIMIT_AS``, set before it imports numpy,
Pillow or modq (so the limit is known to leave room for them), and every input runs under a
``SIGALRM`` left at its default action: a hang kills the child even inside C code, where a
Python handler would never run. Before each input the child writes it to ``current.bin`` and
its arguments to ``current.json``, so whatever kills the child, the input survives it.

Two modes, both through :func:`run_child`:

* fuzz (:func:`fuzz`): random bytes, structured mutations of valid images and valid headers
  with hostile counts and sizes (:func:`structured_input`, ``--mix structured`` for nothing
  else), for a time budget; the run stops at the first input that breaks the contract
  (:func:`check_decoded`);
* measure (:func:`measure`): one input, with its time, peak-RSS growth and Python-traced peak.

Reproduce a saved input (same limits, same address-space cap)::

    .venv/bin/python -m tests.support.fuzz_decode --replay build/fuzz/decode-….bin --draft 64
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import hashlib
import io
import json
import math
import os
import random
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import tracemalloc
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from worker.decode import DecodedImage, DecodeLimits, decode
from worker.errors import CorruptImage, ModqError

__all__ = [
    "ADDRESS_SPACE",
    "FUZZ_LIMITS",
    "ContractError",
    "FuzzRun",
    "check_decoded",
    "fuzz",
    "measure",
    "mutate",
    "random_input",
    "seed_images",
]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
#: room for Python, numpy, Pillow and modq (about 125 MiB of address space) plus a still image
#: at the shipped pixel cap (a 32-bit greyscale TIFF of 50 Mpx, the dearest: 0.8 GiB more,
#: measured; a 16-bit PNG 0.4 GiB), and ten times what decode() takes under FUZZ_LIMITS; far
#: below what a bomb would take
ADDRESS_SPACE = 1536 * MIB
#: the limits the fuzzer and the property tests decode under. At the shipped limits an input
#: can still take seconds (a 75 kB animated WEBP of 1000 frames on a 2500x2500 canvas: every
#: frame decoded to reach the sampled ones, 6-9 s, 0.3 GiB), too few inputs a second; at 4 Mpx
#: and four sampled frames decode() stays near 100 MiB, so a MemoryError can only be an
#: allocation the limits failed to bound.
FUZZ_LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=4_000_000, max_frames=64, sample_frames=4)
DEFAULT_TARGET = "worker.decode:decode"

Target = Callable[[bytes, DecodeLimits, int | None], DecodedImage]


class ContractError(AssertionError):
    """decode() returned something other than RGB frames within the limits."""


def check_decoded(decoded: object, limits: DecodeLimits) -> None:
    """What decode() promises when it does not raise a ModqError."""
    if not isinstance(decoded, DecodedImage):
        raise ContractError(f"decode() returned {type(decoded).__name__}, not a DecodedImage")
    if not 1 <= len(decoded.frames) <= limits.sample_frames:
        raise ContractError(f"{len(decoded.frames)} frames; between 1 and {limits.sample_frames}")
    if decoded.frame_count > limits.max_frames:
        raise ContractError(f"{decoded.frame_count} frames counted past {limits.max_frames}")
    for frame in decoded.frames:
        if frame.mode != "RGB":
            raise ContractError(f"a {frame.mode} frame, not RGB")
        if frame.width * frame.height <= 0:
            raise ContractError(f"an empty {frame.width}x{frame.height} frame")
    held = sum(frame.width * frame.height for frame in decoded.frames)
    if held > limits.max_pixels:
        raise ContractError(f"{held} pixels in the frames together, past the pixel cap")


def hidden_memory_error(exc: BaseException) -> bool:
    """Under the address-space cap an unbounded allocation shows as a MemoryError, which
    decode() reports as the retryable ``resource_exhausted`` (and a parser might wrap it
    into something else): look for it in the chain, whatever error carries it."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        if isinstance(link, MemoryError):
            return True
        seen.append(link)
        link = link.__cause__ or link.__context__
    return False


# --- inputs ------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@cache
def seed_images() -> tuple[bytes, ...]:
    """Small valid images of every allowed format and the paths through decode() they take:
    JPEG (baseline, progressive with EXIF rotation, CMYK), PNG (8-bit, 16-bit, palette with
    transparency, animated), GIF (still, animated), WEBP (still, animated), BMP, TIFF (plain,
    LZW, two pages)."""
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (18, 24, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (16, 12), (60 * i, 255 - 60 * i, 90)) for i in range(4)]
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    deep = Image.fromarray(np.arange(24 * 18, dtype=np.uint16).reshape(18, 24) * 150)
    return (
        _encode(base, "PNG"),
        _encode(base, "JPEG", quality=85),
        _encode(base, "JPEG", exif=exif, progressive=True),
        _encode(base.convert("CMYK"), "JPEG"),
        _encode(base, "GIF"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        _encode(base, "WEBP"),
        _encode(base, "BMP"),
        _encode(base, "TIFF"),
        _encode(base, "TIFF", compression="tiff_lzw"),
        _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:2]),
        _encode(deep, "PNG"),
        _encode(palette, "PNG", transparency=0),
    )


MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"GIF87a",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
)
INTERESTING = {
    1: (0, 1, 0x7F, 0x80, 0xFF),
    2: (0, 1, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF),
    4: (0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF),
}


def random_input(rng: random.Random) -> bytes:
    """Random bytes, half of them behind an allowed format's magic number: without it nearly
    all stop at the format check."""
    noise = rng.randbytes(rng.choice((rng.randrange(64), rng.randrange(4096))))
    return rng.choice(MAGIC) + noise if rng.random() < 0.5 else noise


def _offset(rng: random.Random, data: bytearray) -> int:
    # Headers (sizes, depths, counts, offsets) live near the start: aim there half the time.
    span = len(data) if rng.random() < 0.5 else min(len(data), 128)
    return rng.randrange(span) if span else 0


def _mutate_once(rng: random.Random, data: bytearray, seeds: tuple[bytes, ...]) -> None:
    at = _offset(rng, data)
    kind = rng.randrange(8)
    if kind == 0 and data:
        data[at] ^= 1 << rng.randrange(8)
    elif kind == 1 and data:
        data[at] = rng.randrange(256)
    elif kind == 2:
        width = rng.choice((1, 2, 4))
        packed = struct.pack(rng.choice("<>") + "BHI"[width // 2], rng.choice(INTERESTING[width]))
        data[at : at + width] = packed
    elif kind == 3:
        del data[at:]
    elif kind == 4:
        data[at:at] = rng.randbytes(rng.randrange(1, 17))
    elif kind == 5:
        del data[at : at + rng.randrange(1, 33)]
    elif kind == 6:  # repeat a stretch: chunks, frames and segments that occur twice
        start = _offset(rng, data)
        data[at:at] = data[start : start + rng.randrange(1, 257)]
    else:  # splice: this image's head, another image's tail
        other = rng.choice(seeds)
        data[at:] = other[rng.randrange(len(other)) :]


def _png_chunks(data: bytearray) -> Iterator[tuple[int, bytes, int]]:
    """(start, type, end past the CRC) of every whole chunk, in order."""
    pos = 8
    while pos + 12 <= len(data):
        end = pos + 12 + struct.unpack_from(">I", data, pos)[0]
        if end > len(data):
            return
        yield pos, bytes(data[pos + 4 : pos + 8]), end
        pos = end


def _fix_png_crcs(data: bytearray) -> None:
    """Recompute every chunk CRC: Pillow refuses a PNG chunk whose CRC is wrong, so without
    this almost no PNG mutation would reach the code behind the CRC check."""
    for start, _, end in _png_chunks(data):
        struct.pack_into(">I", data, end - 4, zlib.crc32(data[start + 4 : end - 4]))


def _mutate_png_pixels(rng: random.Random, data: bytearray) -> None:
    """Change the filtered scanlines inside IDAT and compress them again: changes to the
    compressed bytes almost always stop at zlib, never reaching the unfiltering code."""
    idat = [(start, end) for start, kind, end in _png_chunks(data) if kind == b"IDAT"]
    if not idat:
        return
    try:
        raw = bytearray(zlib.decompress(b"".join(data[s + 8 : e - 4] for s, e in idat)))
    except zlib.error:
        return
    for _ in range(rng.randrange(1, 4)):  # filter-type bytes and pixels
        if raw:
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    if rng.random() < 0.3:  # too few or too many scanlines
        del raw[rng.randrange(len(raw) + 1) :]
    elif rng.random() < 0.2:
        raw += rng.randbytes(rng.randrange(1, 64))
    payload = zlib.compress(bytes(raw))
    chunk = struct.pack(">I", len(payload)) + b"IDAT" + payload + b"\0\0\0\0"
    data[idat[0][0] : idat[-1][1]] = chunk


def mutate(rng: random.Random, seed: bytes, seeds: tuple[bytes, ...]) -> bytes:
    data = bytearray(seed)
    if data.startswith(MAGIC[0]) and rng.random() < 0.3:
        _mutate_png_pixels(rng, data)
    else:
        # Mostly one or two changes: with each one more the parser gives up earlier.
        _mutate_once(rng, data, seeds)
        while rng.random() < 0.4:
            _mutate_once(rng, data, seeds)
    if data.startswith(MAGIC[0]) and rng.random() < 0.8:
        _fix_png_crcs(data)
    return bytes(data)


def _format_of(seed: bytes) -> str:
    for magic, name in (
        (b"\x89PNG", "PNG"),
        (b"\xff\xd8", "JPEG"),
        (b"GIF", "GIF"),
        (b"RIFF", "WEBP"),
        (b"BM", "BMP"),
        (b"II", "TIFF"),
        (b"MM", "TIFF"),
    ):
        if seed.startswith(magic):
            return name
    return "?"


def _count(rng: random.Random, top: int) -> int:
    """Log-uniform in 1..top: mostly small counts, now and then one near or past a cap."""
    return int(math.exp(rng.uniform(0.0, math.log(top))))


def structured_input(rng: random.Random) -> tuple[str, bytes]:
    """A valid header with hostile counts and sizes (``tests/support/hostile_images``), drawn
    at random around and past the default caps, and mutated now and then."""
    from tests.support import hostile_images as hostile

    side = rng.choice((1, 4, 64, 500, 2000))
    makers: dict[str, Callable[[], bytes]] = {
        "jpeg scans": lambda: hostile.jpeg_progressive(
            _count(rng, 300), side=rng.choice((8, 64, 512, 2048))
        ),
        "jpeg segments": lambda: hostile.jpeg_segments(
            _count(rng, 250_000), rng.choice((0xFE, 0xE1, 0xE2))
        ),
        "png chunks": lambda: hostile.png_chunks(_count(rng, 90_000), rng.random() < 0.5),
        "apng frames": lambda: hostile.apng_frames(_count(rng, 200), side=max(side, 2)),
        "gif frames": lambda: hostile.gif_frames(_count(rng, 2_000), side=side),
        "gif canvas": lambda: hostile.gif_growing_canvas(_count(rng, 10) + 1),
        "gif extensions": lambda: hostile.gif_extensions(_count(rng, 300_000)),
        "webp frames": lambda: hostile.webp_frames(_count(rng, 300), side=side),
        "tiff pages": lambda: hostile.tiff_pages(_count(rng, 3_000)),
        "tiff loop": hostile.tiff_ifd_loop,
        "tiff strips": lambda: hostile.tiff_strips(
            _count(rng, 250_000), side=rng.choice((1, 16, 300))
        ),
        "tiff tile": lambda: hostile.tiff_huge_tile(
            rng.choice((1, 16, 300)), rng.choice((16, 256, 4096, 65520)), rng.choice((1, 8))
        ),
        "bmp rle": lambda: hostile.bmp_rle_commands(
            _count(rng, 300_000), _count(rng, 3_000), _count(rng, 3_000)
        ),
        "png aspect": lambda: _strip(rng),
    }
    kind = rng.choice(sorted(makers))
    data = makers[kind]()
    if rng.random() < 0.3:
        return f"structured {kind}, mutated", mutate(rng, data, seed_images())
    return f"structured {kind}", data


def _strip(rng: random.Random) -> bytes:
    from tests.support.hostile_images import png_strip

    long_side, short_side = _count(rng, 200_000), _count(rng, 64)
    long_side = min(long_side, 4_000_000 // short_side)  # to keep generating it cheap
    return png_strip(*((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)))


def inputs(rng: random.Random, mix: str = "mixed") -> Iterator[tuple[str, bytes, int | None]]:
    """(source, data, draft) forever. ``mixed``: a fifth random bytes, a tenth valid headers
    with hostile counts, the rest mutated images; ``structured``: only the hostile headers."""
    seeds = seed_images()
    while True:
        draft = rng.choice((None, 64, 512))
        if mix == "structured" or rng.random() < 0.1:
            yield (*structured_input(rng), draft)
        elif rng.random() < 0.2:
            yield "random", random_input(rng), draft
        else:
            seed = rng.choice(seeds)
            yield f"mutated {_format_of(seed)}", mutate(rng, seed, seeds), draft


# --- the child -----------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    """A ``/proc/self/status`` figure in KiB (Linux), or 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss_kib() -> int:
    # VmHWM first: ru_maxrss also counts the pre-exec image, which a vfork'd child shares
    # with its parent (pytest, with all its memory).
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Linux resets the peak-RSS mark to the current RSS on "5" to clear_refs (since 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _load_target(spec: str) -> Target:
    module, name = spec.split(":")
    target: Target = getattr(import_module(module), name)
    return target


class _Recorder:
    """Writes each input to disk before it runs: a child killed by a signal cannot report."""

    def __init__(self, out: Path) -> None:
        self.data = os.open(out / "current.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.meta = os.open(out / "current.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def record(self, data: bytes, meta: dict[str, Any]) -> None:
        for fd, blob in ((self.data, data), (self.meta, json.dumps(meta).encode())):
            os.pwrite(fd, blob, 0)
            os.ftruncate(fd, len(blob))


def run_one(target: Target, data: bytes, limits: DecodeLimits, draft: int | None) -> str:
    """decode() once: "decoded" or the ModqError's code; raises on anything else."""
    with warnings.catch_warnings():
        # Pillow warns about odd metadata; the worker only logs those. The contract is about
        # what decode() raises and returns.
        warnings.simplefilter("ignore")
        try:
            decoded = target(data, limits, draft)
        except ModqError as exc:
            if hidden_memory_error(exc):
                raise MemoryError(f"{exc.code} hides a MemoryError: {exc}") from exc
            return exc.code
    check_decoded(decoded, limits)
    return "decoded"


@dataclass
class _Tally:
    executed: int = 0
    decoded: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    slowest_source: str = ""

    def add(self, source: str, outcome: str, took: float) -> bool:
        """Count one input; True when it is the slowest so far."""
        self.executed += 1
        self.sources[source] += 1
        if outcome == "decoded":
            self.decoded += 1
        else:
            self.codes[outcome] += 1
        if took > self.slowest_s:
            self.slowest_s, self.slowest_source = took, source
            return True
        return False


def _fuzz_loop(args: argparse.Namespace, limits: DecodeLimits, out: Path) -> dict[str, Any]:
    target, recorder = _load_target(args.target), _Recorder(out)
    rng, tally = random.Random(args.seed), _Tally()
    started = time.monotonic()
    deadline = started + args.seconds
    summary: dict[str, Any] = {"failure": None}
    for index, (source, data, draft) in enumerate(inputs(rng, args.mix)):
        if time.monotonic() >= deadline:
            break
        recorder.record(data, {"index": index, "source": source, "draft": draft})
        began = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.input_seconds)
        try:
            outcome = run_one(target, data, limits, draft)
        except BaseException as exc:  # the contract allows nothing else: report, then stop
            summary["failure"] = (
                f"input {index} ({source}): "
                + "".join(traceback.format_exception_only(exc)).strip()
            )
            summary["traceback"] = traceback.format_exc()[-4000:]
            break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if tally.add(source, outcome, time.perf_counter() - began):
            (out / "slowest.bin").write_bytes(data)  # to look at, when it is slow
    # Not asdict(): it rebuilds a Counter from (key, count) pairs, counting the pairs.
    return summary | vars(tally) | {"loop_s": time.monotonic() - started}


def _alarmed(seconds: float, data: bytes, limits: DecodeLimits, draft: int | None) -> str:
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return run_one(decode, data, limits, draft)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _measure_once(args: argparse.Namespace, limits: DecodeLimits) -> dict[str, Any]:
    data = Path(args.measure).read_bytes()
    for seed in seed_images():  # warm-up: lazy imports and first-call caches are not the input's
        run_one(decode, seed, limits, None)
    exact = _reset_peak_rss()  # False: growth below an earlier, higher peak goes unseen
    rss_before, vm_before = _peak_rss_kib(), _status_kib("VmPeak")
    started = time.perf_counter()
    outcome = _alarmed(args.input_seconds, data, limits, args.draft)
    took = time.perf_counter() - started
    rss_after, vm_after = _peak_rss_kib(), _status_kib("VmPeak")
    # Once more under tracemalloc, which slows every allocation: not part of the timing.
    tracemalloc.start()
    _alarmed(args.input_seconds, data, limits, args.draft)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "outcome": outcome,
        "seconds": took,
        "rss_growth_mib": (rss_after - rss_before) / 1024,
        "rss_growth_exact": exact,
        "vm_peak_growth_mib": (vm_after - vm_before) / 1024,
        "traced_peak_mib": traced_peak / MIB,
    }


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fuzz_decode")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--input-seconds", type=float, default=5.0)
    parser.add_argument("--limits", default="{}", help="DecodeLimits fields, as JSON")
    parser.add_argument("--measure", default=None, help="measure one input (a file)")
    parser.add_argument("--replay", default=None, help="run one saved input (a file)")
    parser.add_argument("--draft", type=int, default=None)
    parser.add_argument("--mix", choices=("mixed", "structured"), default="mixed")
    args = parser.parse_args(argv)
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        _limit_resources(ADDRESS_SPACE)  # run by hand; run_child sets it before any import
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang must kill: no handler may catch it
    faulthandler.enable()  # a crash in C code still prints the Python stack that led there
    limits = DecodeLimits(**json.loads(args.limits))
    if args.replay:
        data = Path(args.replay).read_bytes()
        signal.setitimer(signal.ITIMER_REAL, args.input_seconds)
        print(run_one(_load_target(args.target), data, limits, args.draft))
        return 0
    setup = {
        "address_space_mib": resource.getrlimit(resource.RLIMIT_AS)[0] / MIB,
        "setup_vm_mib": _status_kib("VmSize") / 1024,
        "setup_rss_mib": _peak_rss_kib() / 1024,
    }
    if args.measure:
        summary = _measure_once(args, limits)
    else:
        seed_images()  # built before the clock starts
        summary = _fuzz_loop(args, limits, args.out)
    summary |= setup | {"peak_rss_mib": _peak_rss_kib() / 1024}
    (args.out / "summary.json").write_text(json.dumps(summary))
    return 1 if summary.get("failure") else 0


def _limit_resources(address_space: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash the harness provokes leaves no core


# --- the parent ----------------------------------------------------------------------------------

# Sets the caps first, then imports this module (numpy, Pillow, modq) under them.
_BOOTSTRAP = (
    "import resource, runpy, sys; cap = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_AS, (cap, cap)); "
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    "runpy.run_module('tests.support.fuzz_decode', run_name='__main__', alter_sys=True)"
)


@dataclass
class ChildResult:
    returncode: int
    summary: dict[str, Any]
    output: str
    #: why the run broke the contract, in words; None when every input kept it
    failure: str | None = None
    #: the input that broke it, saved where it outlives the test run
    failure_input: Path | None = None
    reproduce: str = ""


def run_child(
    args: list[str], work: Path, timeout: float, address_space: int = ADDRESS_SPACE
) -> ChildResult:
    """Run the child with ``args`` (plus ``--out work``); never raises for what the child did."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").unlink(missing_ok=True)
    # One BLAS thread: OpenBLAS reserves address space per thread, and the cap is per process.
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _BOOTSTRAP, str(address_space), *args, "--out", str(work)]
    try:
        run = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return ChildResult(-1, {}, output, f"the child ran past {timeout:.0f} s and was killed")
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    output = (run.stdout + run.stderr)[-6000:] + summary.get("traceback", "")
    return ChildResult(run.returncode, summary, output, _failure(run.returncode, summary, args))


def _failure(returncode: int, summary: dict[str, Any], args: list[str]) -> str | None:
    if summary.get("failure"):
        return str(summary["failure"])
    if returncode == 0 and summary:
        return None
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if name == "SIGALRM":
            return f"an input ran past the per-input alarm ({_arg(args, '--input-seconds')} s)"
        return f"the child died of {name}"
    return f"the child exited {returncode} without a summary"


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1] if name in args else "?"


def _argv(**options: object) -> list[str]:
    """``--input-seconds 5 --limits {...}`` from ``input_seconds=5, limits={...}``."""
    argv: list[str] = []
    for name, value in options.items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, dict) else str(value)
            argv += ["--" + name.replace("_", "-"), text]
    return argv


def save_failure(result: ChildResult, work: Path, failures: Path, args: list[str]) -> None:
    """Copy the input the child was running to ``failures`` and say how to run it again."""
    current = work / "current.bin"
    if result.failure is None or not current.exists():
        return
    data = current.read_bytes()
    meta = json.loads((work / "current.json").read_text() or "{}")
    failures.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{hashlib.sha256(data).hexdigest()[:16]}"
    result.failure_input = failures / f"{stem}.bin"
    shutil.copyfile(current, result.failure_input)
    (failures / f"{stem}.json").write_text(json.dumps(meta | {"failure": result.failure}) + "\n")
    replay = _argv(
        replay=result.failure_input,
        draft=meta.get("draft"),
        target=_arg(args, "--target"),
        limits=_arg(args, "--limits"),
    )
    result.reproduce = shlex.join([sys.executable, "-m", "tests.support.fuzz_decode", *replay])
    print(
        f"decoder fuzz: {result.failure}\n  input saved: {result.failure_input}\n"
        f"  reproduce: {result.reproduce}"
    )


@dataclass
class FuzzRun:
    seed: int
    budget_s: float
    wall_s: float
    result: ChildResult

    @property
    def executed(self) -> int:
        return int(self.result.summary.get("executed", 0))

    @property
    def codes(self) -> dict[str, int]:
        return dict(self.result.summary.get("codes", {}))

    @property
    def per_second(self) -> float:
        return self.executed / max(float(self.result.summary.get("loop_s", 0.0)), 1e-9)


def fuzz(
    seconds: float,
    work: Path,
    failures: Path,
    *,
    seed: int,
    target: str = DEFAULT_TARGET,
    input_seconds: float = 5.0,
    limits: DecodeLimits | None = None,
    mix: str = "mixed",
) -> FuzzRun:
    """Fuzz ``target`` for ``seconds`` in a capped child, under ``limits`` (FUZZ_LIMITS unless
    given), on ``mix`` inputs (see :func:`inputs`); a broken contract is saved to
    ``failures``: the path is printed and in ``result.failure_input``."""
    args = _argv(
        seconds=seconds,
        seed=seed,
        target=target,
        input_seconds=input_seconds,
        limits=asdict(limits or FUZZ_LIMITS),
        mix=mix,
    )
    started = time.monotonic()
    # Past the budget: the child's start-up, the seed images, and one input's alarm.
    result = run_child(args, work, timeout=seconds + input_seconds + 120)
    save_failure(result, work, failures, args)
    return FuzzRun(seed, seconds, time.monotonic() - started, result)


def measure(data: bytes, work: Path, limits: DecodeLimits, draft: int | None = None) -> ChildResult:
    """decode() one input in a fresh capped process: outcome, seconds, peak-RSS growth, VmPeak
    growth and the Python-traced peak (tracemalloc: numpy's buffers, not Pillow's)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.bin").write_bytes(data)
    args = _argv(measure=work / "input.bin", limits=asdict(limits), input_seconds=30, draft=draft)
    return run_child(args, work, timeout=120)


# --- targets that break the contract on purpose: the harness must notice ----------------------


def triggered(data: bytes) -> bool:
    """Picks about one input in sixteen, by content: a saved input fails again on replay."""
    return hashlib.sha256(data).digest()[0] < 16


def hang_target(data: bytes, limits: DecodeLimits, draft: int | None) -> DecodedImage:
    while triggered(data):
        pass
    return decode(data, limits, draft)


def raise_target(data: bytes, limits: DecodeLimits, draft: int | None) -> DecodedImage:
    if triggered(data):
        raise KeyError("a parser error decode() let through")
    return decode(data, limits, draft)


def crash_target(data: bytes, limits: DecodeLimits, draft: int | None) -> DecodedImage:
    if triggered(data):
        import ctypes

        ctypes.string_at(0)  # a NULL read: SIGSEGV, as a broken C decoder would
    return decode(data, limits, draft)


def allocate_target(data: bytes, limits: DecodeLimits, draft: int | None) -> DecodedImage:
    if triggered(data):
        bytearray(2 * ADDRESS_SPACE)  # twice the cap: fails only if RLIMIT_AS really holds
    return decode(data, limits, draft)


def hidden_allocate_target(data: bytes, limits: DecodeLimits, draft: int | None) -> DecodedImage:
    if triggered(data):
        try:
            bytearray(2 * ADDRESS_SPACE)
        except MemoryError as exc:  # wrapped the way decode() wraps parser exceptions
            raise CorruptImage(f"cannot decode the image: MemoryError: {exc}") from exc
    return decode(data, limits, draft)


def grey_target(data: bytes, limits: DecodeLimits, draft: int | None) -> DecodedImage:
    decoded = decode(data, limits, draft)
    if triggered(data):
        return dataclasses.replace(decoded, frames=tuple(f.convert("L") for f in decoded.frames))
    return decoded


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
