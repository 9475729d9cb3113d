"""The benchmark commands the README shows, run as written but small: they start, measure and
print the figures the README quotes (the figures themselves are not asserted: speed is read
from one run's ratios, never from a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_redis_trips_counts_what_a_request_costs() -> None:
    out = _run("-m", "bench.redis_trips", "--requests", "2")
    rows = dict(re.findall(r"^(miss|near-miss|exact|redelivery)\s+([\d.]+)\s", out, re.M))
    assert set(rows) == {"miss", "near-miss", "exact", "redelivery"}, out
    # The counts are deterministic: the README's 6 / 4 / 1.
    assert float(rows["miss"]) <= 6 and float(rows["exact"]) <= 4, out
    assert float(rows["redelivery"]) == 1, out


def test_scan_bench_prints_cpu_per_image_beside_throughput() -> None:
    out = _run(
        "bench/scan.py",
        "--presets",
        "opennsfw",
        "--images",
        "8",
        "--batch",
        "4",
        "--backstop",
        "--rounds",
        "1",
    )
    assert re.search(r"^opennsfw(\s+[\d.]+){6}$", out, re.M), out  # the last: CPU scan/floor
    assert re.search(r"CPU per image, pool .* / in-process [\d.]+ \(rounds: [\d.]+\)", out), out
