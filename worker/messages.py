"""The wire contract: pydantic models of what producers send and modq publishes.

No heavy imports here: producers install modq to enqueue, not to infer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ActionInfo",
    "BankMatchInfo",
    "CacheInfo",
    "CacheOutcome",
    "ErrorInfo",
    "HashInfo",
    "ModelInfo",
    "ModerationRequest",
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
    pdq: str | None = Field(default=None, description="PDQ (256-bit hex), when banks are on")
    pdq_quality: int | None = Field(default=None, description="PDQ's own quality, 0-100")


class BankMatchInfo(_Frozen):
    """The known-bad hash bank that blocked the image, and how close the match was."""

    bank: str
    distance: int = Field(description="Hamming distance between the PDQ hashes (0-256)")
    hash: str = Field(description="the bank's PDQ hash that matched")


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


IMAGE_SCHEMES = ("s3", "file", "https", "http")
CALLBACK_SCHEMES = ("celery", "redis-stream", "https")
MAX_METADATA_BYTES = 16 * 1024


def _check_uri(value: str, schemes: tuple[str, ...], what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"{what} must use one of {', '.join(s + '://' for s in schemes)}")
    if parts.scheme in ("s3", "https", "http", "celery", "redis-stream") and not parts.netloc:
        raise ValueError(f"{what} {value!r} names no bucket, host, task or stream")
    return value


class ModerationRequest(_Frozen):
    """One image to moderate. ``request_id`` is the idempotency key: a re-delivered request
    re-publishes the same result."""

    schema_version: Literal[1] = 1
    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    image: str = Field(
        max_length=4096,
        description="s3://bucket/key[?versionId=…], file:///path or https://host/path",
    )
    callback: str | None = Field(
        default=None,
        max_length=2048,
        description="celery://task.name?queue=q, redis-stream://stream or https://host/hook",
    )
    policy: str | None = Field(default=None, max_length=256)
    embed: bool = False
    metadata: dict[str, str] = Field(
        default_factory=dict, description="echoed back in the result; at most 16 KiB"
    )

    @field_validator("image")
    @classmethod
    def _image_uri(cls, value: str) -> str:
        return _check_uri(value, IMAGE_SCHEMES, "image")

    @field_validator("callback")
    @classmethod
    def _callback_uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_uri(value, CALLBACK_SCHEMES, "callback")

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str]) -> dict[str, str]:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}")
        return value


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
    bank: BankMatchInfo | None = Field(
        default=None, description="set when a hash bank blocked the image (the model did not run)"
    )
    explanation: str | None = Field(
        default=None, description="where a heatmap of what drove the score was written"
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="the request's, echoed")
    error: ErrorInfo | None = None
