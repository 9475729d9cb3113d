"""The command line behaves like the tools users know: `--version`, settings' environment
variables in `--help`, `--json` and `--report -` for scripts, clear errors and distinct exit
codes (README, "Exit codes")."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.support.cli import MODQ, modq_env, run_modq
from worker.cli import root as cli
from worker.cli.support import EXIT_CRASH, EXIT_PIPE_CLOSED, EXIT_POLICY, EXIT_USAGE
from worker.errors import ConfigError
from worker.messages import ModerationResult

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("brick.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


def _modq(tmp_path: Path, *args: str | Path, **env: str):  # type: ignore[no-untyped-def]
    return run_modq(*args, cwd=tmp_path, cache_home=tmp_path / "cache", env=env)


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    done = _modq(tmp_path, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"modq {version('modq')}"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (("scan",), ["MODQ_MODEL", "MODQ_POLICY", "MODQ_DEVICE", "MODQ_MAX_BATCH_SIZE", "[@rev]"]),
        (("worker",), ["MODQ_CONCURRENCY", "MODQ_QUEUE", "MODQ_MODEL", "MODQ_DEVICE"]),
        (("submit",), ["MODQ_BROKER_URL"]),
        (("calibrate",), ["MODQ_MODEL", "MODQ_PRECISION"]),
    ],
)
def test_help_shows_the_environment_variables_and_brackets_as_written(
    tmp_path: Path, command: tuple[str, ...], shown: list[str]
) -> None:
    done = _modq(tmp_path, *command, "--help")
    assert done.returncode == 0, done.stderr
    for text in shown:
        assert text in done.stdout, text


def test_report_dash_writes_only_jsonl_to_stdout(tmp_path: Path, images: Path) -> None:
    done = _modq(tmp_path, "scan", images, "--report", "-")
    assert done.returncode == 0, done.stderr
    results = [ModerationResult.model_validate_json(line) for line in done.stdout.splitlines()]
    assert sorted(Path(r.image).name for r in results) == ["brick.jpg", "coffee.jpg", "rocket.jpg"]
    assert "images/s" in done.stderr  # the summary moved to stderr
    assert not (tmp_path / "-").exists()


def test_scan_json_prints_one_summary_document(tmp_path: Path, images: Path) -> None:
    done = _modq(tmp_path, "scan", images, "--json", "--report", tmp_path / "r.jsonl")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == 3 and sum(summary["verdicts"].values()) == 3
    assert summary["report"] == str(tmp_path / "r.jsonl")
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
    both = _modq(tmp_path, "scan", images, "--json", "--report", "-")
    assert both.returncode == EXIT_USAGE and "stdout" in both.stderr


def test_models_list_and_info_as_json(tmp_path: Path) -> None:
    listed = _modq(tmp_path, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["preset"]: row for row in json.loads(listed.stdout)}
    assert rows["opennsfw"]["available"] == "yes (bundled)"
    assert {"marqo", "falconsai", "freepik", "adamcodd"} <= rows.keys()
    info = _modq(tmp_path, "models", "info", "opennsfw", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["id"] == "yahoo/open_nsfw"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("scan", "no-such-folder"), "does not exist"),
        (
            ("scan", "{images}", "--policy", "missing-policy.json"),
            "missing-policy.json does not exist",
        ),
        (("scan", "{images}", "--policy", "conf/strict-ish"), "does not exist"),
        (("scan", "{images}", "--policy", "nonsense"), "unknown policy 'nonsense'"),
        (("scan", "{images}", "--model", "no-such-model"), "no-such-model"),
        (("scan", "{images}", "--bogus-option"), "No such option"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(
    tmp_path: Path, images: Path, args: tuple[str, ...], says: str
) -> None:
    done = _modq(tmp_path, *(a.replace("{images}", str(images)) for a in args))
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "modq-report.jsonl").exists()  # refused before any work


def test_a_path_that_does_not_exist_scans_nothing(tmp_path: Path, images: Path) -> None:
    done = _modq(tmp_path, "scan", images, tmp_path / "typo")
    assert done.returncode == EXIT_USAGE
    assert not (tmp_path / "modq-report.jsonl").exists()


def test_fail_on_is_exit_1_and_only_that(tmp_path: Path, images: Path) -> None:
    block_all = tmp_path / "block-all.json"
    block_all.write_text(json.dumps({"name": "block-all", "review_at": 0.0, "block_at": 0.0}))
    blocked = _modq(tmp_path, "scan", images, "--policy", block_all, "--fail-on", "block")
    assert blocked.returncode == EXIT_POLICY, blocked.stderr
    passed = _modq(tmp_path, "scan", images, "--policy", block_all, "--fail-on", "error")
    assert passed.returncode == 0, passed.stderr


def _main_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> int:
    def explode() -> None:
        raise exc

    monkeypatch.setattr(cli, "app", explode)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


def test_what_escapes_a_command_gets_its_own_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main_with(monkeypatch, RuntimeError("a bug")) == EXIT_CRASH
    assert "Traceback" in capsys.readouterr().err
    assert _main_with(monkeypatch, ConfigError("MODQ_X is wrong")) == EXIT_USAGE
    assert "[config] MODQ_X is wrong" in capsys.readouterr().err
    missing = ModuleNotFoundError("No module named 'timm'", name="timm")
    assert _main_with(monkeypatch, missing) == EXIT_USAGE
    assert "pip install 'modq[torch]'" in capsys.readouterr().err
    broken = ModuleNotFoundError("No module named 'numpy'", name="numpy")  # not an extra's
    assert _main_with(monkeypatch, broken) == EXIT_CRASH


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MODQ_MAX_WAIT_MS": "abc"}, "MODQ_MAX_WAIT_MS"),
        ({"MODQ_LOG_JSON": "maybe"}, "MODQ_LOG_JSON"),
        ({"MODQ_DEVICE": "quantum"}, "MODQ_DEVICE"),
        ({"MODQ_PERCEPTUAL_RADIUS": "999"}, "MODQ_PERCEPTUAL_RADIUS"),
    ],
)
@pytest.mark.parametrize(
    "command", [("scan", "{images}"), ("worker",), ("models", "export-onnx", "x")]
)
def test_a_setting_modq_cannot_use_is_exit_2_naming_its_variable(
    tmp_path: Path, images: Path, env: dict[str, str], named: str, command: tuple[str, ...]
) -> None:
    done = _modq(tmp_path, *(a.replace("{images}", str(images)) for a in command), **env)
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert named in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_report_that_cannot_be_written_is_refused_before_scanning(
    tmp_path: Path, images: Path
) -> None:
    (tmp_path / "a-folder").mkdir()
    done = _modq(tmp_path, "scan", images, "--report", tmp_path / "a-folder")
    assert done.returncode == EXIT_USAGE and "is a folder" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_that_leaves_early_is_exit_141_not_a_policy_outcome(tmp_path: Path) -> None:
    """`modq scan --report - | head -1`: the exit a tool that SIGPIPE ends gives, not 1.
    With embeddings each line is some 20 KB: more than a pipe holds, so the scan is still
    writing when the reader leaves."""
    process = subprocess.Popen(
        [str(MODQ), "scan", str(EXAMPLES), "--embed", "--report", "-"],
        cwd=tmp_path, env=modq_env(tmp_path / "cache"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # as head does after its line
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=120) == EXIT_PIPE_CLOSED, stderr
    assert ModerationResult.model_validate_json(first).status.value == "ok"
    assert "Traceback" not in stderr
