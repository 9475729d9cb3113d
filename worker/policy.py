"""Scores to a verdict. Pure: thresholds in, verdict out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ConfigError
from worker.messages import Verdict
from worker.models.card import ModelCard

__all__ = ["POLICY_NAMES", "Policy", "load_policy"]

POLICY_NAMES = ("default", "strict", "lenient")


@dataclass(frozen=True)
class Policy:
    name: str
    review_at: float
    block_at: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.review_at <= self.block_at <= 1.0:
            raise ConfigError(
                f"policy {self.name}: need 0 <= review_at ({self.review_at}) "
                f"<= block_at ({self.block_at}) <= 1"
            )

    def decide(self, nsfw_score: float) -> Verdict:
        if nsfw_score >= self.block_at:
            return Verdict.BLOCK
        if nsfw_score >= self.review_at:
            return Verdict.REVIEW
        return Verdict.ALLOW


def load_policy(name_or_file: str, card: ModelCard) -> Policy:
    """A named policy relative to the model's own thresholds, or a JSON policy file
    (``{"name": …, "review_at": …, "block_at": …}``)."""
    review = float(card.extra.get("review_at", 0.5))
    block = float(card.extra.get("block_at", 0.85))
    if name_or_file == "default":
        return Policy("default", review, block)
    if name_or_file == "strict":
        # Flag more: review from half the usual score, block from the middle of the band.
        return Policy("strict", review / 2, (review + block) / 2)
    if name_or_file == "lenient":
        return Policy("lenient", (review + block) / 2, block + (1 - block) / 2)
    path = Path(name_or_file)
    if path.exists() and not path.is_file():
        raise ConfigError(f"policy file {path} is not a regular file")
    if not path.exists():
        if path.suffix or len(path.parts) > 1:  # meant as a file: say so, not "unknown policy"
            raise ConfigError(f"policy file {path} does not exist")
        raise ConfigError(
            f"unknown policy {name_or_file!r}: use one of {', '.join(POLICY_NAMES)} or a JSON file"
        )
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError("the file must hold one JSON object")
        return Policy(
            str(raw.get("name", path.stem)), float(raw["review_at"]), float(raw["block_at"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"policy file {path}: {exc!r}; expected review_at and block_at") from exc
