"""Measure inputs against the decoding budget, in a fresh process.

The budget (README, "Decoding untrusted bytes"): any input within the byte cap is refused or
classified within 5 s of CPU and 1 GiB of memory above the worker's baseline, for every
preset. The child imports everything, builds every preset's model card, warms up on an
ordinary photo, then, for each input in turn, takes a baseline (CPU from ``getrusage``,
resident memory, and the peak-RSS mark reset, which Linux allows) and runs ``decode`` and
``preprocess`` for each card on every frame, and ``forward`` where a look-alike is named. It
reports per input the outcome (the typed error's code or ``classified``), CPU seconds and
peak memory above that input's baseline. An input named ``WxH.strip`` is no file but an RGB
image of that size made in memory and given to ``preprocess`` alone (decode would refuse it).

The child runs under ``RLIMIT_CPU`` and ``RLIMIT_AS`` far above the budget, so an input that
breaks the budget by a lot ends the child (reported as killed), never the machine.

    .venv/bin/python -m tests.support.budget FILE... [--limits JSON] [--forward PRESET=DIR]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BUDGET_CPU_S", "BUDGET_MIB", "Budget", "measure_budget", "preset_cards"]

BUDGET_CPU_S = 5.0
BUDGET_MIB = 1024.0
ROOT = Path(__file__).resolve().parents[2]
MARKER = "MODQ-BUDGET "
PRESETS = ("opennsfw", "marqo", "falconsai", "freepik", "adamcodd")


@dataclass(frozen=True)
class Budget:
    outcome: str  # "classified", a ModqError code, or "killed: …"
    cpu_s: float
    peak_mib: float
    maxrss_mib: float  # ru_maxrss growth (a floor: it cannot be reset)
    frames: int = 0

    @property
    def within(self) -> bool:
        return (
            not self.outcome.startswith("killed")
            and self.cpu_s <= BUDGET_CPU_S
            and self.peak_mib <= BUDGET_MIB
        )


def preset_cards() -> list[Any]:
    """The model card of every preset, from the configs shipped with modq (no weights)."""
    from worker.models.factory import build_card
    from worker.models.lookalike import _config_dir
    from worker.models.registry import PRESETS as KNOWN
    from worker.models.registry import ResolvedModel, resolve

    cards = [build_card(resolve("opennsfw"))]
    for name in PRESETS[1:]:
        preset = KNOWN[name]
        resolved = ResolvedModel(name, str(preset.hub_id), _config_dir(name), "configs", preset)
        cards.append(build_card(resolved))
    return cards


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from worker.decode import DecodeLimits, decode
    from worker.errors import ModqError
    from worker.models.preprocess import draft_size, preprocess

    cards = preset_cards()
    backends = {}
    for spec in args.forward:
        preset, folder = spec.split("=", 1)
        from worker.models.factory import create_backend

        backends[preset] = create_backend(folder, precision="fp32")
    limits = DecodeLimits(**json.loads(args.limits))
    draft = min(draft_size(card) for card in cards)

    def classify(frames: tuple[Image.Image, ...], preset: str | None) -> None:
        for card, name in zip(cards, PRESETS, strict=True):
            if preset in (None, name):
                np.stack([preprocess(card, frame) for frame in frames])
        for name, backend in backends.items():  # a look-alike has its own (tiny) input size
            if preset in (None, name):
                backend.forward(np.stack([backend.preprocess(frame) for frame in frames]))

    def run(blob: bytes, preset: str | None) -> tuple[str, int]:
        try:
            decoded = decode(blob, limits, draft)
        except ModqError as exc:
            return exc.code, 0
        classify(decoded.frames, preset)
        return "classified", len(decoded.frames)

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    run(buffer.getvalue(), None)  # warm-up: first-call costs are the worker's, not the input's
    del photo, buffer
    presets: list[str | None] = list(PRESETS) if args.per_preset else [None]
    for path, preset in ((path, preset) for path in args.inputs for preset in presets):
        strip = Path(path).name.removesuffix(".strip") if path.endswith(".strip") else None
        data = b"" if strip else Path(path).read_bytes()
        gc.collect()
        exact = _reset_peak()
        rss, maxrss, cpu = _status_kib("VmRSS"), _maxrss_kib(), _cpu_s()
        if strip:
            width, height = (int(side) for side in strip.split("x"))
            classify((Image.new("RGB", (width, height), (90, 140, 200)),), preset)
            outcome, frames = "classified", 1
        else:
            outcome, frames = run(data, preset)
        took = _cpu_s() - cpu
        peak = (_status_kib("VmHWM") if exact else _maxrss_kib()) - rss
        result = {
            "outcome": outcome,
            "cpu_s": took,
            "peak_mib": peak / 1024,
            "maxrss_mib": (_maxrss_kib() - maxrss) / 1024,
            "frames": frames,
        }
        name = Path(path).name + (f"@{preset}" if preset else "")
        print(MARKER + json.dumps({"input": name} | result), flush=True)


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Linux resets the peak-RSS mark (VmHWM) to the current RSS on "5" to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_budget(
    inputs: dict[str, bytes | tuple[int, int]],
    work: Path,
    *,
    limits: dict[str, Any] | None = None,
    forward: dict[str, Path] | None = None,
    cpu_limit_s: int = 120,
    address_space_gib: int = 12,
    per_preset: bool = False,
) -> dict[str, Budget]:
    """Run each input through decode and every preset's preprocess, in turn, in one fresh
    child; an input given as ``(width, height)`` is an in-memory image for preprocess alone.
    ``per_preset``: each preset measured on its own (a worker runs one), keyed
    ``name@preset``. An input the child did not finish (and those after it) reports
    ``killed``."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in inputs.items():
        if isinstance(data, tuple):
            path = work / f"{data[0]}x{data[1]}.strip"
            path.touch()
        else:
            path = work / name
            path.write_bytes(data)
        paths.append(path)
    argv = [sys.executable, "-m", "tests.support.budget", *map(str, paths)]
    argv += ["--limits", json.dumps(limits or {})]
    for preset, folder in (forward or {}).items():
        argv += ["--forward", f"{preset}={folder}"]
    argv += ["--cpu-limit", str(cpu_limit_s), "--address-space-gib", str(address_space_gib)]
    argv += ["--per-preset"] if per_preset else []
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=4 * cpu_limit_s, env=env
    )
    done: dict[str, Budget] = {}
    for line in run.stdout.splitlines():
        if line.startswith(MARKER):
            report = json.loads(line[len(MARKER) :])
            name = report.pop("input")
            done[name] = Budget(**report)
    tail = (run.stdout + run.stderr)[-400:].strip().replace("\n", " | ")
    killed = Budget(f"killed: exit {run.returncode}: {tail}", float(cpu_limit_s), 0.0, 0.0)
    suffixes = [f"@{preset}" for preset in PRESETS] if per_preset else [""]
    results = {}
    for name, path in zip(inputs, paths, strict=True):
        for suffix in suffixes:
            results[name + suffix] = done.get(path.name + suffix, killed)
    return results


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.budget")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--limits", default="{}", help="DecodeLimits fields, as JSON")
    parser.add_argument("--forward", action="append", default=[], help="PRESET=LOOKALIKE_DIR")
    parser.add_argument("--cpu-limit", type=int, default=60)
    parser.add_argument("--address-space-gib", type=int, default=12)
    parser.add_argument("--per-preset", action="store_true")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_limit, args.cpu_limit + 5))
    space = args.address_space_gib << 30
    resource.setrlimit(resource.RLIMIT_AS, (space, space))
    _child(args)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
