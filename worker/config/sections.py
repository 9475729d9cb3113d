"""The pieces of ``Settings`` each adapter takes: small frozen values, built by ``Settings``
(``settings.decode``, ``.batching``, …) from the flat ``MODQ_*`` fields."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import SecretStr

__all__ = [
    "BankSettings",
    "BatchingSettings",
    "CacheSettings",
    "CallbackSettings",
    "DecodeLimits",
    "DecodeSettings",
    "DeliverySettings",
    "EndpointSettings",
    "HttpSettings",
    "LogSettings",
    "MetricsSettings",
    "QuarantineAction",
    "StorageSettings",
]

QuarantineAction = Literal["move", "copy", "tag"]


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 40 * 1024 * 1024
    #: pixels in one frame, and in all the sampled frames of one image together
    max_pixels: int = 50_000_000
    max_frames: int = 1_000
    sample_frames: int = 8
    #: long side over short side
    max_aspect_ratio: float = 100.0
    #: progressive JPEG scans (common encoders write about 10)
    max_scans: int = 100
    #: items a decoder walks one at a time: JPEG marker segments, PNG and WebP chunks, GIF
    #: blocks, TIFF IFD entries and numeric values, BMP run-length commands
    max_segments: int = 100_000
    #: canvas pixels composed while stepping through an animation's frames to the last
    max_animation_pixels: int = 500_000_000

    def first_frame(self) -> DecodeLimits:
        """The same limits for a command that looks at an animation's first frame only."""
        return replace(self, sample_frames=1)


@dataclass(frozen=True)
class DecodeSettings:
    """Decode limits and the decode backstop (``worker.decode``, ``worker.decode.pool``)."""

    limits: DecodeLimits = field(default_factory=DecodeLimits)
    exact: bool = False
    processes: int | None = None
    cpu_s: float = 4.0
    max_memory_mb: int = 1024
    wall_s: float = 20.0


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = 32
    max_wait_ms: float = 10.0


@dataclass(frozen=True)
class CacheSettings:
    """The verdict cache and the stored results (Redis), and the perceptual tier."""

    url: str | None = None
    prefix: str = "modq"
    ttl_s: int = 30 * 24 * 3600
    result_ttl_s: int = 7 * 24 * 3600
    perceptual_radius: int = 6
    perceptual_reuse_safe: bool = False


@dataclass(frozen=True)
class BankSettings:
    """The known-bad hash banks. ``url``: MODQ_BANK_URL, else the verdict cache's Redis;
    ``named_by``: the setting that named it, when one was given (an unreadable store then
    makes images wait)."""

    url: str | None = None
    prefix: str = "modq"
    max_distance: int = 31
    quality_min: int = 50
    named_by: str | None = None


@dataclass(frozen=True)
class DeliverySettings:
    """Queue mode: the broker, the queues, retries, leases and deliveries."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "modq"
    dead_letter_queue: str = "modq.dead"
    task_threads: int = 64
    prefetch_multiplier: int = 1
    task_time_limit_s: int = 300
    visibility_timeout_s: int = 3600
    max_retries: int = 8
    max_deliveries: int = 3
    lease_ttl_s: float = 30.0
    retry_backoff_max_s: int = 120
    pending_sweep_s: float = 30.0


@dataclass(frozen=True)
class StorageSettings:
    """Where references may point, and the quarantine."""

    allowed_roots: tuple[str, ...] = ()
    allowed_buckets: tuple[str, ...] = ()
    s3_endpoint_url: str | None = None
    quarantine_uri: str | None = None
    quarantine_action: QuarantineAction = "move"


@dataclass(frozen=True)
class HttpSettings:
    """Outbound HTTP: image fetches and webhooks."""

    timeout_s: float = 10.0
    allowed_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallbackSettings:
    """Where results go. ``redis_url``: MODQ_CALLBACK_REDIS_URL, else the broker;
    ``reserved_names``/``reserved_prefixes``: queue and key names no callback may target."""

    default: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    webhook_secret: SecretStr | None = None
    webhook_retries: int = 5
    webhook_timeout_s: float = 10.0
    reserved_names: tuple[str, ...] = ()
    reserved_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EndpointSettings:
    """Where an embedding sink or record source URI resolves: ``s3://`` at the S3 endpoint,
    ``redis-stream://`` at the callback Redis (MODQ_CALLBACK_REDIS_URL, else the broker)."""

    s3_endpoint_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class MetricsSettings:
    port: int = 9808
    addr: str = "127.0.0.1"


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"
    json: bool | None = None

    def writes_json(self, *, worker: bool) -> bool:
        """The log format this command writes (``MODQ_LOG_JSON``, else JSON for a worker)."""
        return worker if self.json is None else self.json
