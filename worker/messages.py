"""The wire contract: pydantic models of what modq publishes. No heavy imports here."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActionInfo",
    "CacheInfo",
    "CacheOutcome",
    "ErrorInfo",
    "HashInfo",
    "ModelInfo",
    "ModerationResult",
    "Status",
    "Timings",
    "Verdict",
]


class Verdict(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    BLOCK = "block"


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"


class CacheOutcome(StrEnum):
    EXACT = "exact"
    PERCEPTUAL = "perceptual"
    MISS = "miss"
    DISABLED = "disabled"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInfo(_Frozen):
    id: str
    revision: str
    runtime: str
    precision: str


class CacheInfo(_Frozen):
    outcome: CacheOutcome
    distance: int | None = None


class HashInfo(_Frozen):
    sha256: str
    phash: str | None = None
    dhash: str | None = None


class ActionInfo(_Frozen):
    kind: Literal["none", "quarantine_move", "quarantine_copy", "tag"]
    location: str | None = None


class Timings(_Frozen):
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    total_ms: float = 0.0


class ErrorInfo(_Frozen):
    code: str
    message: str
    retryable: bool


class ModerationResult(_Frozen):
    schema_version: Literal[1] = 1
    request_id: str
    image: str = Field(description="the image reference as given (file://, s3://, https://)")
    status: Status
    verdict: Verdict | None = None
    nsfw_score: float | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    level: str | None = None
    level_scores: dict[str, float] | None = None
    frames: int | None = Field(default=None, description="frames scored (animated images)")
    model: ModelInfo | None = None
    cache: CacheInfo | None = None
    hashes: HashInfo | None = None
    action: ActionInfo | None = None
    timings: Timings = Field(default_factory=Timings)
    embedding: list[float] | None = None
    error: ErrorInfo | None = None
