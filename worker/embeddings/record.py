"""One embedding as modq writes it: the vector and what a reviewer needs to find the image.

The same record comes from a sink shard (JSONL or Parquet), a Redis stream entry, or a line of
a ``modq scan --embed`` report, so an index can be built from any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.errors import InvalidDataset

__all__ = ["EmbeddingRecord"]

_TEXT_FIELDS = ("request_id", "image", "sha256", "model", "revision", "verdict")


@dataclass(frozen=True, eq=False)
class EmbeddingRecord:
    request_id: str
    image: str
    sha256: str
    model: str
    revision: str
    verdict: str
    nsfw_score: float
    vector: np.ndarray  # (dim,) float32
    # Where the image is now when a quarantine move took it away from ``image``.
    location: str | None = None

    def fields(self) -> dict[str, Any]:
        """Everything but the vector."""
        row: dict[str, Any] = {name: getattr(self, name) for name in _TEXT_FIELDS}
        row["nsfw_score"] = self.nsfw_score
        row["location"] = self.location
        return row

    def to_dict(self) -> dict[str, Any]:
        return {**self.fields(), "embedding": [float(v) for v in self.vector]}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EmbeddingRecord:
        """A shard row, or a scan report line (a moderation result with an embedding)."""
        if "hashes" in row or "status" in row:
            row = _flatten_result(row)
        try:
            vector = np.asarray(row["embedding"], dtype=np.float32)
            texts = {name: str(row[name]) for name in _TEXT_FIELDS}
            location = row.get("location")
            record = cls(
                **texts,
                nsfw_score=float(row["nsfw_score"]),
                vector=vector,
                location=None if location is None else str(location),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidDataset(f"not an embedding record: {exc!r}") from exc
        if vector.ndim != 1 or vector.size == 0 or not np.isfinite(vector).all():
            raise InvalidDataset(
                f"{record.image}: the embedding must be a non-empty list of finite numbers"
            )
        return record


def _flatten_result(result: dict[str, Any]) -> dict[str, Any]:
    """The record fields of a moderation result (a ``modq scan --embed`` report line)."""
    model = result.get("model") or {}
    hashes = result.get("hashes") or {}
    action = result.get("action") or {}
    moved = action.get("kind") == "quarantine_move"
    return {
        "request_id": result.get("request_id"),
        "image": result.get("image"),
        "sha256": hashes.get("sha256"),
        "model": model.get("id"),
        "revision": model.get("revision"),
        "verdict": result.get("verdict"),
        "nsfw_score": result.get("nsfw_score"),
        "embedding": result.get("embedding"),
        "location": action.get("location") if moved else None,
    }
