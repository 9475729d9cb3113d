"""decode() fuzzed for a fixed time budget in a capped child process (tests/support/fuzz_decode),
and the harness's self-check: a target that hangs, crashes, raises outside the ModqError tree,
allocates past the cap (whether the MemoryError shows or is wrapped in a ModqError) or returns
non-RGB frames makes the run fail, with the input saved."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Observe
from tests.support.fuzz_decode import (
    ADDRESS_SPACE,
    FUZZ_LIMITS,
    MIB,
    ROOT,
    FuzzRun,
    fuzz,
    triggered,
)
from tests.support.reliability import full_scale, scaled

pytestmark = pytest.mark.reliability

#: the budget, in seconds: CI runs a short one, ``make soak`` (MODQ_SOAK=1) a long one
BUDGET = scaled(30, 600)
#: where a failing input is kept: outside the test's tmp_path, which pytest deletes
FAILURES = ROOT / "build" / "fuzz"
#: a hang is an input past this; the slowest seen under FUZZ_LIMITS took under 0.2 s
INPUT_SECONDS = 5.0


def _seed() -> int:
    """A new seed each run (each explores other inputs); MODQ_FUZZ_SEED repeats one."""
    return int(os.environ.get("MODQ_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))


def _observed(run: FuzzRun) -> str:
    summary, result = run.result.summary, run.result
    if result.failure:
        return (
            f"FAILED after {run.executed:,} inputs (seed {run.seed}): {result.failure}; "
            f"input saved to {result.failure_input}"
        )
    codes = ", ".join(f"`{code}` {count:,}" for code, count in sorted(run.codes.items()))
    sources = sorted(summary["sources"].items(), key=lambda item: -item[1])
    mix = ", ".join(f"{source} {count / run.executed:.0%}" for source, count in sources)
    return (
        f"{run.executed:,} inputs in {summary['loop_s']:.0f} s ({run.per_second:,.0f}/s, seed "
        f"{run.seed}; {mix}), at most "
        f"{FUZZ_LIMITS.max_pixels / 1e6:.0f} Mpx and {FUZZ_LIMITS.max_frames} frames: "
        f"{summary['decoded']:,} decoded to RGB frames, the rest typed errors ({codes}); "
        f"none crashed, raised another error or ran past the {INPUT_SECONDS:.0f} s alarm "
        f"(slowest {summary['slowest_s']:.2f} s); child peak RSS "
        f"{summary['peak_rss_mib']:.0f} MiB under a {summary['address_space_mib']:.0f} MiB "
        "address-space cap"
    )


def test_decoder_fuzz_for_a_fixed_budget(tmp_path: Path, observe: Observe) -> None:
    run = fuzz(BUDGET, tmp_path / "work", FAILURES, seed=_seed(), input_seconds=INPUT_SECONDS)
    summary, failed = run.result.summary, run.result.failure is not None
    observe(
        "image.fuzz",
        _observed(run),
        sent=run.executed + failed,  # the failing input was sent, and never answered
        received=run.executed,
        lost=int(failed),
        scale="full" if full_scale() else "ci",
        extra={"seed": run.seed, "inputs_per_s": round(run.per_second)}
        | {k: summary[k] for k in ("peak_rss_mib", "slowest_s", "decoded") if k in summary},
    )
    assert not failed, (
        f"{run.result.failure}\ninput: {run.result.failure_input}\n"
        f"reproduce: {run.result.reproduce}\n{run.result.output}"
    )
    # The cap was in force, and Python, numpy, Pillow and modq fit well under it.
    assert summary["address_space_mib"] == ADDRESS_SPACE / MIB
    assert summary["setup_vm_mib"] < summary["address_space_mib"] / 4
    assert summary["peak_rss_mib"] < summary["address_space_mib"]
    # The budget bought inputs, and they got past the format check into the decoders.
    assert run.executed >= 20 * BUDGET, summary
    assert summary["decoded"] >= run.executed / 100, summary
    assert {"corrupt_image", "unsupported_format", "too_many_pixels"} <= set(run.codes), summary


#: the structure-aware run's budget, and the shipped caps it runs at: the walk's caps are what
#: it tests, so they are the defaults, with FUZZ_LIMITS' byte, pixel and frame caps
STRUCTURED_BUDGET = scaled(20, 300)
STRUCTURED_LIMITS = FUZZ_LIMITS


def test_structure_aware_fuzz_for_a_fixed_budget(tmp_path: Path, observe: Observe) -> None:
    """Valid headers with hostile counts and sizes drawn at random (progressive scans, marker
    segments, chunks, frames, canvases, pages, strips, tiles, RLE commands, aspect ratios),
    some mutated: each ends in a typed error or RGB frames, within the per-input alarm and
    the child's address-space cap."""
    run = fuzz(
        STRUCTURED_BUDGET,
        tmp_path / "work",
        FAILURES,
        seed=_seed(),
        input_seconds=INPUT_SECONDS,
        limits=STRUCTURED_LIMITS,
        mix="structured",
    )
    summary, failed = run.result.summary, run.result.failure is not None
    observe(
        "image.fuzz_structure",
        _observed(run),
        sent=run.executed + failed,
        received=run.executed,
        lost=int(failed),
        scale="full" if full_scale() else "ci",
        extra={"seed": run.seed, "inputs_per_s": round(run.per_second)}
        | {k: summary[k] for k in ("peak_rss_mib", "slowest_s", "decoded") if k in summary},
    )
    assert not failed, (
        f"{run.result.failure}\ninput: {run.result.failure_input}\n"
        f"reproduce: {run.result.reproduce}\n{run.result.output}"
    )
    assert summary["peak_rss_mib"] < summary["address_space_mib"]
    assert summary["slowest_s"] < INPUT_SECONDS
    kinds = {source.split(",")[0] for source in summary["sources"]}
    assert len(kinds) >= 10, summary["sources"]  # the budget bought most classes
    assert summary["decoded"] >= 1, summary  # not all refused: counts below the caps pass
    assert {"too_complex", "too_many_frames"} <= set(run.codes), summary


@pytest.mark.parametrize(
    ("target", "input_seconds", "failure"),
    [
        ("hang_target", 1.0, "ran past the per-input alarm (1.0 s)"),
        ("crash_target", 5.0, "died of SIGSEGV"),
        ("raise_target", 5.0, "KeyError: 'a parser error decode() let through'"),
        ("allocate_target", 5.0, "): MemoryError"),
        ("hidden_allocate_target", 5.0, "MemoryError: corrupt_image hides a MemoryError"),
        ("grey_target", 5.0, "ContractError: a L frame, not RGB"),
    ],
    ids=["hang", "crash", "raise", "allocate", "hidden-allocate", "grey"],
)
def test_the_harness_reports_a_broken_contract(
    tmp_path: Path, target: str, input_seconds: float, failure: str
) -> None:
    """Each target breaks the contract on about one input in sixteen (chosen by the input's
    hash, so the saved input breaks it again on replay) and decodes the others."""
    spec = f"tests.support.fuzz_decode:{target}"
    work, failures = tmp_path / "work", tmp_path / "failures"
    run = fuzz(30, work, failures, seed=1, target=spec, input_seconds=input_seconds)
    assert run.result.failure is not None, run.result.summary
    assert failure in run.result.failure, run.result.output
    assert run.wall_s < 25  # it stopped at the failure, not at the end of the budget
    saved = run.result.failure_input
    assert saved is not None and saved.exists()
    assert triggered(saved.read_bytes())  # the very input the target broke the contract on
    meta = json.loads(saved.with_suffix(".json").read_text())
    assert meta["failure"] == run.result.failure
    assert str(saved) in run.result.reproduce


def test_a_saved_input_replays(tmp_path: Path) -> None:
    """The printed command runs the saved input again, under the same limits and cap."""
    spec = "tests.support.fuzz_decode:raise_target"
    run = fuzz(30, tmp_path / "work", tmp_path / "failures", seed=2, target=spec)
    assert run.result.reproduce, run.result.output
    replay = subprocess.run(
        shlex.split(run.result.reproduce), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert replay.returncode != 0
    assert "KeyError: 'a parser error decode() let through'" in replay.stderr
