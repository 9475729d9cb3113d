"""`modq finetune` through its typer command, then `modq scan --model OUT` as a user runs it
(the installed console script in a subprocess) on the written model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.unit.models._support import require_torch_stack
from tests.unit.test_finetune import LABELS, write_pattern_dataset
from worker.cli.finetune import register
from worker.messages import ModerationResult, Status, Verdict

MODQ = Path(sys.executable).parent / "modq"


def _app() -> typer.Typer:
    """A typer app holding only `finetune`, registered as worker/cli/root.py registers it."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modq (test app)."""

    register(app)
    return app


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No MODQ_ settings from the machine; the embedding cache under the test's folder."""
    for name in list(os.environ):
        if name.startswith("MODQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _scan(images: Path, model: Path, report: Path) -> subprocess.CompletedProcess[str]:
    assert MODQ.is_file(), f"the modq console script is not installed next to {sys.executable}"
    return subprocess.run(
        [str(MODQ), "scan", str(images), "--model", str(model), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )


@pytest.mark.parametrize("base", ["opennsfw", "falconsai"])
def test_finetune_then_scan_with_the_written_model(base: str, isolated: Path) -> None:
    data = write_pattern_dataset(isolated / "data", per_class=40)
    spec = base
    if base != "opennsfw":
        require_torch_stack()
        from worker.models.lookalike import build_lookalike

        spec = str(build_lookalike(base, isolated / "base", seed=5, tiny=True))
    out = isolated / "team-model"

    run = CliRunner().invoke(_app(), ["finetune", str(data), "--out", str(out), "--model", spec])
    assert run.exit_code == 0, run.output
    assert "val acc" in run.stdout and "F1 nsfw" in run.stdout  # the per-epoch table
    assert f"wrote {out}" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["val_accuracy"] >= 0.9
    assert (isolated / "xdg-cache" / "modq" / "embeddings.sqlite3").is_file()

    report = isolated / "report.jsonl"
    scan = _scan(data, out, report)
    assert scan.returncode == 0, scan.stderr
    results = [
        ModerationResult.model_validate_json(line) for line in report.read_text().splitlines()
    ]
    assert len(results) == 80
    correct = 0
    for result in results:
        assert result.status is Status.OK
        assert set(result.scores) == set(LABELS)
        assert result.model.id == "local:team-model"
        assert result.nsfw_score == pytest.approx(result.scores["nsfw"])
        warm = Path(result.image).parent.name == "nsfw"
        correct += (result.nsfw_score >= 0.5) == warm
        assert result.verdict in set(Verdict)
    assert correct / len(results) >= 0.9


def test_bad_input_exits_2_with_the_error_code(isolated: Path) -> None:
    data = write_pattern_dataset(isolated / "data", per_class=3)
    (data / "safe").rename(isolated / "elsewhere")
    run = CliRunner().invoke(_app(), ["finetune", str(data), "--out", str(isolated / "m")])
    assert run.exit_code == 2
    assert "[invalid_dataset]" in run.stderr and "at least 2" in run.stderr

    (isolated / "elsewhere").rename(data / "safe")
    full = CliRunner().invoke(
        _app(), ["finetune", str(data), "--out", str(isolated / "m"), "--mode", "full"]
    )
    assert full.exit_code == 2
    assert "[model_config]" in full.stderr and "torch" in full.stderr
    assert not (isolated / "m").exists()
