"""The scores-to-verdict policy: thresholds, named policies and policy files.

The verdict caches' contract is tests/unit/test_cache_contract.py (memory, SQLite) and
tests/integration/test_redis_cache.py (Redis)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.messages import Verdict
from worker.models.card import ModelCard
from worker.policy import POLICY_NAMES, Policy, load_policy

# --- policy -----------------------------------------------------------------------------------


def _card(review_at: float, block_at: float) -> ModelCard:
    return ModelCard(
        id="test/model",
        revision="r1",
        runtime="onnx",
        labels=("sfw", "nsfw"),
        input_size=224,
        crop="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        embedding_dim=None,
        extra={"review_at": review_at, "block_at": block_at},
    )


SEVERITY = {Verdict.ALLOW: 0, Verdict.REVIEW: 1, Verdict.BLOCK: 2}
SCORES = [i / 200 for i in range(201)]


@pytest.mark.parametrize(
    ("score", "verdict"),
    [
        (0.0, Verdict.ALLOW),
        (0.2999, Verdict.ALLOW),
        (0.3, Verdict.REVIEW),
        (0.6999, Verdict.REVIEW),
        (0.7, Verdict.BLOCK),
        (1.0, Verdict.BLOCK),
    ],
)
def test_decide_thresholds(score: float, verdict: Verdict) -> None:
    assert Policy("p", review_at=0.3, block_at=0.7).decide(score) is verdict


def test_decide_with_equal_thresholds_never_reviews() -> None:
    policy = Policy("p", 0.5, 0.5)
    assert {policy.decide(s) for s in SCORES} == {Verdict.ALLOW, Verdict.BLOCK}


def test_block_at_zero_blocks_everything() -> None:
    policy = Policy("all", 0.0, 0.0)
    assert {policy.decide(s) for s in SCORES} == {Verdict.BLOCK}


@pytest.mark.parametrize(("review", "block"), [(0.2, 0.8), (0.5, 0.85), (0.2, 0.5), (0.0, 1.0)])
def test_named_policies_are_ordered(review: float, block: float) -> None:
    card = _card(review, block)
    policies = {name: load_policy(name, card) for name in POLICY_NAMES}
    assert policies["default"] == Policy("default", review, block)
    for name, policy in policies.items():
        assert policy.name == name
    for score in SCORES:
        strict = SEVERITY[policies["strict"].decide(score)]
        default = SEVERITY[policies["default"].decide(score)]
        lenient = SEVERITY[policies["lenient"].decide(score)]
        assert strict >= default >= lenient, score


def test_strict_and_lenient_really_differ_from_default() -> None:
    card = _card(0.5, 0.85)
    verdicts = {name: [load_policy(name, card).decide(s) for s in SCORES] for name in POLICY_NAMES}
    assert verdicts["strict"] != verdicts["default"] != verdicts["lenient"]


def test_policy_json_file(tmp_path: Path) -> None:
    path = tmp_path / "house.json"
    path.write_text(json.dumps({"name": "house", "review_at": 0.1, "block_at": 0.4}))
    policy = load_policy(str(path), _card(0.5, 0.85))
    assert policy == Policy("house", 0.1, 0.4)
    assert policy.decide(0.05) is Verdict.ALLOW
    assert policy.decide(0.2) is Verdict.REVIEW
    assert policy.decide(0.4) is Verdict.BLOCK


def test_policy_json_file_name_defaults_to_stem(tmp_path: Path) -> None:
    path = tmp_path / "blocky.json"
    path.write_text(json.dumps({"review_at": 0.0, "block_at": 0.0}))
    assert load_policy(str(path), _card(0.5, 0.85)) == Policy("blocky", 0.0, 0.0)


@pytest.mark.parametrize(
    ("review", "block"),
    [(0.9, 0.5), (-0.1, 0.5), (0.2, 1.5), (float("nan"), 0.5), (0.2, float("inf"))],
)
def test_invalid_thresholds_raise_config_error(review: float, block: float) -> None:
    with pytest.raises(ConfigError) as info:
        Policy("bad", review, block)
    assert info.value.code == "config"


@pytest.mark.parametrize(
    "content",
    [
        '{"review_at": 0.9, "block_at": 0.1}',  # out of order
        '{"review_at": 0.2}',  # missing block_at
        '{"review_at": "low", "block_at": 0.8}',  # not a number
        '{"review_at": null, "block_at": 0.8}',
        "not json at all",
        "[0.2, 0.8]",  # valid JSON, but not an object
    ],
)
def test_invalid_policy_files_raise_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_policy(str(path), _card(0.5, 0.85))


def test_unknown_policy_name_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_policy("paranoid", _card(0.5, 0.85))
    with pytest.raises(ConfigError):
        load_policy(str(tmp_path / "missing.json"), _card(0.5, 0.85))
