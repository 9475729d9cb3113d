"""`modq scan` never lends a near-duplicate a cached verdict below block.

Two files a pHash puts within the radius of each other, scored by the bundled open_nsfw model
itself: the first scores review under a policy file whose thresholds fall between the two
scores, the second block. Scanned one after the other with the same verdict cache, the second
must be classified and blocked, not handed the first one's review.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Observe
from tests.support.cli import run_modq
from tests.support.near_duplicates import hashes, own_score, skin_pair
from worker.config import Settings
from worker.hashing.mih import hamming
from worker.hashing.phash_index import parse_hash
from worker.messages import CacheOutcome, ModerationResult, Status, Verdict
from worker.models.factory import create_backend

RADIUS = Settings.model_fields["perceptual_radius"].default


def _only(report: Path) -> ModerationResult:
    lines = report.read_text().splitlines()
    assert len(lines) == 1, lines
    result = ModerationResult.model_validate_json(lines[0])
    assert result.status is Status.OK, result.error
    return result


def _said(result: ModerationResult) -> str:
    assert result.cache is not None and result.verdict is not None
    return f"cache `{result.cache.outcome.value}`, verdict {result.verdict.value}"


@pytest.mark.reliability
def test_a_block_scored_near_duplicate_of_a_review_is_blocked(
    tmp_path: Path, observe: Observe
) -> None:
    grey, skin = skin_pair()
    backend = create_backend("opennsfw")
    low, high = own_score(backend, grey), own_score(backend, skin)
    distance = hamming(
        parse_hash(hashes(backend, grey).phash), parse_hash(hashes(backend, skin).phash)
    )
    assert high - low > 0.02 and distance <= RADIUS, (low, high, distance)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "first.png").write_bytes(grey)
    (uploads / "second.jpg").write_bytes(skin)
    policy = tmp_path / "between.json"
    policy.write_text(
        json.dumps({"name": "between", "review_at": low / 2, "block_at": (low + high) / 2})
    )
    cache_home = tmp_path / "xdg-cache"

    def scan(name: str, **env: str) -> tuple[ModerationResult, str]:
        report = tmp_path / f"{name}.jsonl"
        done = run_modq(
            "scan",
            uploads / name,
            "--policy",
            policy,
            "--report",
            report,
            cwd=tmp_path,
            cache_home=cache_home,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        return _only(report), done.stderr

    first, _ = scan("first.png")
    # The option that once let near-duplicates inherit safe verdicts: accepted, warned about.
    second, stderr = scan("second.jpg", MODQ_PERCEPTUAL_REUSE_SAFE="true")

    assert first.cache is not None and first.cache.outcome is CacheOutcome.MISS
    assert first.verdict is Verdict.REVIEW
    assert first.nsfw_score == pytest.approx(low, abs=1e-4)
    assert second.hashes is not None and first.hashes is not None
    assert second.hashes.phash is not None and first.hashes.phash is not None
    assert hamming(parse_hash(first.hashes.phash), parse_hash(second.hashes.phash)) == distance
    assert second.cache is not None and second.cache.outcome is CacheOutcome.MISS
    assert second.verdict is Verdict.BLOCK
    assert second.nsfw_score == pytest.approx(high, abs=1e-4)
    assert "MODQ_PERCEPTUAL_REUSE_SAFE is deprecated" in stderr
    observe(
        "cache.near_review_then_block",
        f"open_nsfw scored the first file {low:.3f} (review under a policy file with review "
        f"at {low / 2:.3f}, block at {(low + high) / 2:.3f}) and its near-duplicate (pHash "
        f"distance {distance}) {high:.3f}; scanned in turn with one verdict cache: first "
        f"{_said(first)}, second {_said(second)} with its own score "
        f"{second.nsfw_score:.3f}, even with MODQ_PERCEPTUAL_REUSE_SAFE=true (warned)",
        sent=2,
        received=2,
    )
