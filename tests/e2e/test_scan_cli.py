"""`modq` as a user runs it: the installed console script in a subprocess, on real files."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support.cli import run_modq
from tests.support.corpus import build_corpus
from worker.messages import CacheOutcome, ModerationResult, Status, Verdict
from worker.models.registry import PRESETS
from worker.scan import IMAGE_SUFFIXES


def _modq(*args: str | Path, cwd: Path, cache_home: Path) -> subprocess.CompletedProcess[str]:
    return run_modq(*args, cwd=cwd, cache_home=cache_home)


def _report(path: Path) -> list[ModerationResult]:
    lines = path.read_text().splitlines()
    return [ModerationResult.model_validate_json(line) for line in lines]


def _summary_row(stdout: str) -> dict[str, str]:
    """The summary table as {column: value}."""
    header = next(line for line in stdout.splitlines() if "images/s" in line)
    columns = [c.strip() for c in header.strip().strip("┃").split("┃")]
    lines = stdout.splitlines()
    row = next(line for line in lines[lines.index(header) + 1 :] if "│" in line)
    values = [v.strip() for v in row.strip().strip("│").split("│")]
    assert len(values) == len(columns)
    return dict(zip(columns, values, strict=True))


def _column(row: dict[str, str], *names: str) -> str:
    """A summary value by its column, whichever of its accepted names the table uses."""
    found = [row[name] for name in names if name in row]
    assert len(found) == 1, (names, row)
    return found[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def scan_dir(tmp_path: Path, corpus: list[Path]) -> Path:
    """A few corpus images of different kinds, plus one truncated JPEG."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    picked: dict[str, Path] = {}
    for path in sorted(corpus):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES and suffix not in picked:
            picked[suffix] = path
    chosen = list(picked.values())[:6]
    assert len(chosen) >= 3
    for path in chosen:
        shutil.copy(path, folder / path.name)
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(buffer, "JPEG", quality=95)
    (folder / "zz-broken.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return folder


def _inputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_scan_then_rescan_hits_the_cache(tmp_path: Path, scan_dir: Path) -> None:
    cache_home = tmp_path / "xdg-cache"
    report = tmp_path / "out" / "report.jsonl"
    inputs = _inputs(scan_dir)

    first = _modq("scan", scan_dir, "--report", report, cwd=tmp_path, cache_home=cache_home)
    assert first.returncode == 0, first.stderr
    results = _report(report)
    assert len(results) == len(inputs)
    by_name = {Path(r.image).name: r for r in results}
    assert set(by_name) == inputs
    broken = by_name.pop("zz-broken.jpg")
    assert broken.status is Status.ERROR
    assert broken.error is not None and broken.error.code == "corrupt_image"
    for name, result in by_name.items():
        assert result.status is Status.OK, (name, result.error)
        assert result.verdict in set(Verdict)
        assert set(result.scores) == {"sfw", "nsfw"}
        assert result.cache is not None and result.cache.outcome is CacheOutcome.MISS
    assert "images/s" in first.stdout
    assert str(report.resolve()) in first.stdout
    summary = _summary_row(first.stdout)
    assert summary["images"] == str(len(inputs))
    assert summary["errors"] == "1"
    assert (cache_home / "modq" / "verdicts.sqlite3").is_file()  # XDG_CACHE_HOME was honoured

    second = _modq("scan", scan_dir, "--report", report, cwd=tmp_path, cache_home=cache_home)
    assert second.returncode == 0, second.stderr
    again = {Path(r.image).name: r for r in _report(report)}
    assert set(again) == inputs
    assert again["zz-broken.jpg"].status is Status.ERROR
    for name, result in by_name.items():
        hit = again[name]
        assert hit.cache is not None and hit.cache.outcome is CacheOutcome.EXACT, name
        assert hit.scores == result.scores
        assert hit.verdict is result.verdict
    assert _column(_summary_row(second.stdout), "cached", "cache hits") == str(len(by_name))
    # Files were only read.
    assert _inputs(scan_dir) == inputs


def test_policy_file_quarantine_and_fail_on_block(tmp_path: Path, scan_dir: Path) -> None:
    cache_home = tmp_path / "xdg-cache"
    policy = tmp_path / "block-all.json"
    policy.write_text(json.dumps({"name": "block-all", "review_at": 0.0, "block_at": 0.0}))
    quarantine = tmp_path / "quarantine"
    report = tmp_path / "report.jsonl"
    originals = {p.name: p.read_bytes() for p in scan_dir.iterdir()}

    run = _modq(
        "scan",
        scan_dir,
        "--report",
        report,
        "--policy",
        policy,
        "--quarantine-to",
        quarantine,
        "--fail-on",
        "block",
        cwd=tmp_path,
        cache_home=cache_home,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    results = {Path(r.image).name: r for r in _report(report)}
    assert set(results) == set(originals)
    assert results["zz-broken.jpg"].status is Status.ERROR
    assert (scan_dir / "zz-broken.jpg").exists()  # errors are never quarantined
    good = {name: r for name, r in results.items() if name != "zz-broken.jpg"}
    for name, result in good.items():
        assert result.verdict is Verdict.BLOCK, name
        assert result.action is not None and result.action.kind == "quarantine_move", name
        moved = Path(result.action.location or "")
        assert moved.parent == quarantine
        assert moved.read_bytes() == originals[name]
        assert moved.with_name(moved.name + ".json").is_file()
        assert not (scan_dir / name).exists()
    assert _column(_summary_row(run.stdout), "moved", "quarantined") == str(len(good))


def test_fail_on_never_and_block_without_blocks(tmp_path: Path, scan_dir: Path) -> None:
    # A policy that never blocks: --fail-on block must exit 0, --fail-on error exit 1.
    cache_home = tmp_path / "xdg-cache"
    policy = tmp_path / "never.json"
    policy.write_text(json.dumps({"review_at": 1.0, "block_at": 1.0}))
    report = tmp_path / "r.jsonl"
    common = ("--report", report, "--policy", policy)
    ok = _modq("scan", scan_dir, *common, "--fail-on", "block", cwd=tmp_path, cache_home=cache_home)
    assert ok.returncode == 0, ok.stderr
    failed = _modq(
        "scan", scan_dir, *common, "--fail-on", "error", cwd=tmp_path, cache_home=cache_home
    )
    assert failed.returncode == 1


def test_unknown_policy_exits_2_with_its_code(tmp_path: Path, scan_dir: Path) -> None:
    inputs = _inputs(scan_dir)
    run = _modq(
        "scan",
        scan_dir,
        "--report",
        tmp_path / "r.jsonl",
        "--policy",
        "no-such-policy",
        cwd=tmp_path,
        cache_home=tmp_path / "xdg-cache",
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "[config]" in run.stderr  # the stable code, as printed for the user
    assert "no-such-policy" in run.stderr
    assert _inputs(scan_dir) == inputs  # nothing was touched


def test_models_list(tmp_path: Path) -> None:
    run = _modq("models", "list", cwd=tmp_path, cache_home=tmp_path / "xdg-cache")
    assert run.returncode == 0, run.stderr
    assert len(PRESETS) == 5
    for name in ("opennsfw", "marqo", "falconsai", "freepik", "adamcodd"):
        assert name in run.stdout, name


def test_models_info_opennsfw(tmp_path: Path) -> None:
    run = _modq("models", "info", "opennsfw", cwd=tmp_path, cache_home=tmp_path / "xdg-cache")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["labels"] == ["sfw", "nsfw"]
    assert info["unsafe_labels"] == ["nsfw"]
    assert info["runtime"] == "onnx"
    assert Path(info["path"]).is_file()


def test_models_info_unknown_model_exits_2(tmp_path: Path) -> None:
    run = _modq("models", "info", "no-such-model", cwd=tmp_path, cache_home=tmp_path / "xdg")
    assert run.returncode == 2
    assert "model_not_found" in run.stderr


def test_importing_the_wire_contract_stays_light() -> None:
    heavy = ("torch", "onnxruntime", "timm", "transformers")
    code = (
        "import json, sys; import worker.messages; "
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(run.stdout) == []
