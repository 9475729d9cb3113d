"""`modq scan` and `modq bank` find the hash banks the same way, and a scan never answers
`allow` for an image it could not check against banks a deployment switched on. Through the
installed console script, on a redis-server this module starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import run_modq
from tests.support.images import recompressed, textured
from tests.support.redis_server import RedisServer, free_port
from worker.messages import ModerationResult, Verdict


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis_server:
        yield redis_server


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    known, uploads = tmp_path / "known", tmp_path / "uploads"
    known.mkdir()
    uploads.mkdir()
    textured(71).save(known / "known.png")
    recompressed(textured(71)).save(uploads / "reupload.jpg")
    textured(72).save(uploads / "other.png")
    return known, uploads


def _report(path: Path) -> dict[str, ModerationResult]:
    results = [ModerationResult.model_validate_json(line) for line in path.read_text().splitlines()]
    return {Path(r.image).name: r for r in results}


def test_scan_checks_the_banks_bank_add_wrote_through_the_cache_url(
    server: RedisServer, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    known, uploads = folders
    env = {"MODQ_CACHE_URL": f"redis://127.0.0.1:{server.port}/3"}  # no MODQ_BANK_URL
    added = run_modq("bank", "add", "known-bad", known, cwd=tmp_path, cache_home=tmp_path, env=env)
    assert added.returncode == 0, added.stderr
    report = tmp_path / "report.jsonl"
    scanned = run_modq(
        "scan", uploads, "--report", report, cwd=tmp_path, cache_home=tmp_path, env=env
    )
    assert scanned.returncode == 0, scanned.stderr
    results = _report(report)
    reupload = results["reupload.jpg"]
    assert reupload.verdict is Verdict.BLOCK
    assert reupload.bank is not None and reupload.bank.bank == "known-bad"
    assert results["other.png"].bank is None


@pytest.mark.parametrize("setting", ["MODQ_BANK_URL", "MODQ_CACHE_URL"])
def test_scan_refuses_to_run_when_the_named_bank_store_cannot_be_read(
    setting: str, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    _, uploads = folders
    report = tmp_path / "report.jsonl"
    env = {setting: f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    scanned = run_modq(
        "scan", uploads, "--report", report, cwd=tmp_path, cache_home=tmp_path, env=env
    )
    assert scanned.returncode == 2, scanned.stdout + scanned.stderr
    assert setting in scanned.stderr and "hash banks cannot be read" in scanned.stderr
    assert not report.exists() or "allow" not in report.read_text()
