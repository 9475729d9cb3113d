"""The wire contract: pydantic models of what producers send and modq publishes.

No heavy imports here: producers install modq to enqueue, not to infer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

__all__ = [
    "DEAD_LETTER_TASK",
    "MODERATE_TASK",
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

#: the task a request is sent to, and the one its dead letter is (names on the wire)
MODERATE_TASK = "modq.moderate"
DEAD_LETTER_TASK = "modq.dead_letter"


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


# The reference syntax as patterns, so that the JSON Schemas carry it: a request the schema
# accepts is never refused as invalid_request for its syntax. Each pattern holds in every
# engine that reads it (pydantic's Rust regex, Python's re, ECMAScript for ajv): no
# lookaround, no `.`, and `$` only where the string must end.
def _ipv6() -> str:
    """RFC 3986's IPv6address (no zone id): what ``urlsplit`` accepts between brackets."""
    h16, octet = "[0-9A-Fa-f]{1,4}", "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    ls32 = rf"(?:{h16}:{h16}|{octet}(?:\.{octet}){{3}})"
    forms = [rf"(?:{h16}:){{6}}{ls32}", rf"::(?:{h16}:){{5}}{ls32}"]
    forms += [rf"(?:{h16})?::(?:{h16}:){{4}}{ls32}"]
    forms += [rf"(?:(?:{h16}:){{0,{n - 1}}}{h16})?::(?:{h16}:){{{4 - n}}}{ls32}" for n in (2, 3, 4)]
    forms += [rf"(?:(?:{h16}:){{0,4}}{h16})?::{ls32}", rf"(?:(?:{h16}:){{0,5}}{h16})?::{h16}"]
    forms += [rf"(?:(?:{h16}:){{0,6}}{h16})?::"]
    return "(?:" + "|".join(forms) + ")"


_IPV6 = rf"\[{_ipv6()}\]"
_USERINFO = r"[A-Za-z0-9._~%!$&'()*+,;=:-]*@"
# RFC 3986 userinfo, host and port characters, or an IPv6 literal with its port
_AUTHORITY = rf"(?:[A-Za-z0-9._~%!$&'()*+,;=:@-]+|(?:{_USERINFO})?{_IPV6}(?::[0-9]*)?)"
_NAME = r"[A-Za-z0-9_.:-][A-Za-z0-9_.:/-]{0,255}"  # a task or stream name (worker.callbacks)
IMAGE_PATTERN = rf"^(?:(?:s3|https?)://{_AUTHORITY}(?:[/?#]|$)|file:///)"
CALLBACK_PATTERN = (
    rf"^(?:celery://{_NAME}(?:\?queue=[A-Za-z0-9_.:-]{{1,256}})?"
    rf"|redis-stream://{_NAME}"
    rf"|https://(?:[A-Za-z0-9.-]+|{_IPV6})(?::[0-9]{{1,5}})?(?:[/?][^#]*)?)$"
)
#: a metadata key or value: longer than the whole budget can never fit in it
_MetadataString = Annotated[str, StringConstraints(max_length=MAX_METADATA_BYTES)]


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
        pattern=IMAGE_PATTERN,
        description="s3://bucket/key[?versionId=…], file:///path or https://host/path",
    )
    callback: str | None = Field(
        default=None,
        max_length=2048,
        pattern=CALLBACK_PATTERN,
        description="celery://task.name?queue=q (without ?queue: Celery's default queue, "
        "celery), redis-stream://stream or https://host/hook",
    )
    policy: str | None = Field(
        default=None,
        max_length=256,
        description="a policy this worker has: default, strict, lenient or the operator's own",
    )
    embed: bool = False
    metadata: dict[_MetadataString, _MetadataString] = Field(
        default_factory=dict,
        description="echoed back in the result; keys and values together at most 16 KiB "
        "(16384 bytes of UTF-8), which JSON Schema can only bound per string",
    )

    # Before the field's pattern, so that a wrong scheme or a missing host is named plainly;
    # the pattern (the schema's) then checks the rest of the syntax.
    @field_validator("image", mode="before")
    @classmethod
    def _image_uri(cls, value: object) -> object:
        return _check_uri(value, IMAGE_SCHEMES, "image") if isinstance(value, str) else value

    @field_validator("callback", mode="before")
    @classmethod
    def _callback_uri(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return _check_uri(value, CALLBACK_SCHEMES, "callback")

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
