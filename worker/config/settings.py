"""One Settings object, read from MODQ_* environment variables (or a .env file) at the edge,
and handed out in pieces.

``Settings`` keeps every documented ``MODQ_*`` name as one flat field (so the environment,
``.env`` files and error messages stay as the README says). Each adapter takes only its own
piece: ``settings.decode``, ``.batching``, ``.cache``, ``.banks``, ``.delivery`` (the queue),
``.storage``, ``.http``, ``.callbacks``, ``.metrics`` and ``.logging`` are small frozen
values built here, so what a module may read is what its constructor takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.config.sections import (
    BankSettings,
    BatchingSettings,
    CacheSettings,
    CallbackSettings,
    DecodeLimits,
    DecodeSettings,
    DeliverySettings,
    EndpointSettings,
    HttpSettings,
    LogSettings,
    MetricsSettings,
    QuarantineAction,
    StorageSettings,
)
from worker.errors import ConfigError

__all__ = ["Precision", "ProducerSettings", "Settings", "default_cache_dir", "settings_error"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Lists read from the environment as comma-separated values: MODQ_ALLOWED_BUCKETS=a,b
CommaList = Annotated[list[str], NoDecode]


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modq"


class ProducerSettings(BaseSettings):
    """What a producer reads: the broker, the queue, and the key prefix of the record of
    requests the transport may lose. ``Settings`` adds the worker's own; a producer never
    reads them, so a variable only the worker uses cannot stop it enqueueing."""

    model_config = SettingsConfigDict(env_prefix="MODQ_", env_file=".env", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    queue: str = "modq"
    cache_prefix: str = Field("modq", description="key prefix of every key modq writes")
    broker_transport_options: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        description="extra kombu transport options as JSON, e.g. "
        '{"unacked_restore_interval": 1}; visibility_timeout comes from its own setting',
    )
    pending_sweep_s: float = Field(
        30.0,
        ge=0,
        description="Redis broker: how often a worker looks for requests the transport lost "
        "(popped, never unacked) and re-sends them; 0 = producers record nothing, no sweep",
    )


class Settings(ProducerSettings):
    model: str = Field("opennsfw", description="preset, directory, .onnx file or Org/name[@rev]")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps)$", description="auto, cpu, cuda or cuda:N"
    )
    precision: Precision = "auto"
    policy: str = Field("default", description="default, strict, lenient or a JSON policy file")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0)
    threads: int = Field(0, ge=0, description="inference threads; 0 = all cores")
    exact_decode: bool = Field(False, description="decode JPEGs at full size (no draft mode)")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    max_image_bytes: int = Field(40 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_frames: int = Field(1_000, ge=1)
    sample_frames: int = Field(8, ge=1)
    max_aspect_ratio: float = Field(100.0, ge=1, description="long side over short side")
    max_jpeg_scans: int = Field(100, ge=1, description="scans of a progressive JPEG")
    max_segments: int = Field(
        100_000,
        ge=1,
        description="marker segments, chunks, blocks, IFD entries or RLE commands in one image",
    )
    max_animation_pixels: int = Field(
        500_000_000, ge=1, description="canvas pixels composed walking an animation's frames"
    )
    decode_processes: int | None = Field(
        None,
        ge=0,
        description="decoder child processes, the hard backstop on decoding (CPU-time and "
        "memory limits per decode); unset = one per core; 0 = decode in the worker itself, "
        "with no backstop",
    )
    decode_cpu_s: float = Field(4.0, gt=0, description="CPU time one decode may use")
    decode_max_memory_mb: int = Field(
        1024, ge=16, description="memory one decoder process may use above its start-up size"
    )
    decode_wall_s: float = Field(
        20.0, gt=0, description="wall time one decode may take (a stalled decoder is replaced)"
    )
    log_level: str = "INFO"
    log_json: bool | None = Field(
        None,
        description="JSON log lines on stderr: unset, the worker writes JSON and the other "
        "commands readable lines; true or false, every command writes that format",
    )

    # -- queue mode ------------------------------------------------------------------------
    cache_url: str | None = Field(
        "redis://127.0.0.1:6379/1",
        description="Redis for the verdict cache and stored results; empty disables the cache",
    )
    cache_ttl_s: int = Field(30 * 24 * 3600, ge=1, description="verdict cache entry lifetime")
    result_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="how long a published result is kept so a re-delivery re-publishes it",
    )
    bank_url: str | None = Field(
        None,
        description="Redis of the known-bad hash banks, for `modq bank`, `modq scan` and the "
        "worker alike; default: MODQ_CACHE_URL. When set, an unreadable bank store always "
        "makes images wait",
    )
    bank_max_distance: int = Field(31, ge=0, le=47, description="PDQ Hamming distance (256-bit)")
    bank_quality_min: int = Field(
        50,
        ge=0,
        le=100,
        description="PDQ quality below which an image is never matched against banks",
    )
    perceptual_radius: int = Field(6, ge=0, le=16, description="max Hamming distance (64-bit)")
    perceptual_reuse_safe: bool = Field(
        False,
        description="deprecated and ignored (a warning is logged): perceptual matches reuse "
        "only block verdicts",
    )
    dead_letter_queue: str = "modq.dead"
    concurrency: int = Field(0, ge=0, description="task threads; 0 = 2 x max_batch_size")
    prefetch_multiplier: int = Field(1, ge=1)
    task_time_limit_s: int = Field(300, ge=1, description="hard limit of one task")
    visibility_timeout_s: int = Field(3600, ge=1, description="Redis broker visibility timeout")
    max_retries: int = Field(8, ge=0)
    max_deliveries: int = Field(
        3,
        ge=1,
        description="deliveries of one request that may end with their worker process dying "
        "(out of memory, a crash) before the request is answered too_many_deliveries",
    )
    lease_ttl_s: float = Field(
        30.0,
        gt=0,
        description="a request's lease (one delivery works on it at a time) lasts this long "
        "unless its holder renews it; a dead holder's lease frees after it",
    )
    retry_backoff_max_s: int = Field(120, ge=1)
    task_events: bool = Field(
        False,
        description="send Celery task events from the worker's start; off, a monitor that "
        "wants them (Flower does by default) turns them on when it connects",
    )
    metrics_port: int = Field(9808, ge=0, le=65535, description="Prometheus port; 0 = off")
    metrics_addr: str = Field(
        "127.0.0.1",
        description="address the Prometheus endpoint binds: loopback by default; 0.0.0.0 (or "
        "::) for a scraper or probe outside the host or container",
    )
    malloc_arenas: int = Field(
        2, ge=0, description="glibc malloc arenas of `modq worker` (MALLOC_ARENA_MAX); 0 = glibc's"
    )

    # -- storage ----------------------------------------------------------------------------
    allowed_roots: CommaList = Field(
        default_factory=list, description="directories file:// references may read"
    )
    allowed_buckets: CommaList = Field(
        default_factory=list, description="buckets s3:// references may read"
    )
    s3_endpoint_url: str | None = Field(None, description="MinIO or another S3-compatible store")
    http_timeout_s: float = Field(10.0, gt=0)
    http_allowed_networks: CommaList = Field(
        default_factory=list,
        description="CIDRs http(s):// may reach despite being private (an internal CDN)",
    )
    quarantine_uri: str | None = Field(
        None, description="s3://bucket/prefix/ or file:///dir; unset = no quarantine"
    )
    quarantine_action: QuarantineAction = "move"

    # -- callbacks --------------------------------------------------------------------------
    default_callback: str | None = Field(
        None, description="where results go when a request names no callback"
    )
    callback_redis_url: str | None = Field(
        None, description="Redis for redis-stream:// callbacks; default: the broker"
    )
    embedding_sink: str | None = Field(
        None,
        description="stream every embedding the model computes: file:///dir, "
        "s3://bucket/prefix/ (?format=jsonl|parquet) or redis-stream://name; unset = off",
    )
    review_heatmaps_uri: str | None = Field(
        None,
        description="write a heatmap PNG for every `review` verdict into file:///dir or "
        "s3://bucket/prefix/ and put its reference in the result's `explanation`; unset = off",
    )
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key for webhooks")
    webhook_retries: int = Field(5, ge=0)
    webhook_timeout_s: float = Field(10.0, gt=0)

    @field_validator("allowed_roots", "allowed_buckets", "http_allowed_networks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "cache_url",
        "quarantine_uri",
        "s3_endpoint_url",
        "default_callback",
        "embedding_sink",
        "bank_url",
        "review_heatmaps_uri",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @classmethod
    def with_options(cls, **options: object) -> Settings:
        """The environment's settings with the command-line options that were given (not
        None) on top. A value modq cannot use is a ``ConfigError`` naming its variable."""
        given = {name: value for name, value in options.items() if value is not None}
        try:
            return cls(**given)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise settings_error(exc) from exc

    @property
    def stream_redis_url(self) -> str:
        """The Redis of redis-stream:// callbacks and sinks: MODQ_CALLBACK_REDIS_URL, else the
        broker."""
        return self.callback_redis_url or self.broker_url

    @property
    def task_threads(self) -> int:
        return self.concurrency or 2 * self.max_batch_size

    # -- the pieces each adapter takes ----------------------------------------------------
    @property
    def decode(self) -> DecodeSettings:
        limits = DecodeLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_frames=self.max_frames,
            sample_frames=self.sample_frames,
            max_aspect_ratio=self.max_aspect_ratio,
            max_scans=self.max_jpeg_scans,
            max_segments=self.max_segments,
            max_animation_pixels=self.max_animation_pixels,
        )
        return DecodeSettings(
            limits=limits,
            exact=self.exact_decode,
            processes=self.decode_processes,
            cpu_s=self.decode_cpu_s,
            max_memory_mb=self.decode_max_memory_mb,
            wall_s=self.decode_wall_s,
        )

    @property
    def batching(self) -> BatchingSettings:
        return BatchingSettings(self.max_batch_size, self.max_wait_ms)

    @property
    def cache(self) -> CacheSettings:
        return CacheSettings(
            url=self.cache_url,
            prefix=self.cache_prefix,
            ttl_s=self.cache_ttl_s,
            result_ttl_s=self.result_ttl_s,
            perceptual_radius=self.perceptual_radius,
            perceptual_reuse_safe=self.perceptual_reuse_safe,
        )

    @property
    def banks(self) -> BankSettings:
        named_by = None
        if self.bank_url is not None:
            named_by = "MODQ_BANK_URL"
        elif self.cache_url is not None and "cache_url" in self.model_fields_set:
            named_by = "MODQ_CACHE_URL"
        return BankSettings(
            url=self.bank_url or self.cache_url,
            prefix=self.cache_prefix,
            max_distance=self.bank_max_distance,
            quality_min=self.bank_quality_min,
            named_by=named_by,
        )

    @property
    def delivery(self) -> DeliverySettings:
        return DeliverySettings(
            broker_url=self.broker_url,
            queue=self.queue,
            dead_letter_queue=self.dead_letter_queue,
            task_threads=self.task_threads,
            prefetch_multiplier=self.prefetch_multiplier,
            task_time_limit_s=self.task_time_limit_s,
            visibility_timeout_s=self.visibility_timeout_s,
            max_retries=self.max_retries,
            max_deliveries=self.max_deliveries,
            lease_ttl_s=self.lease_ttl_s,
            retry_backoff_max_s=self.retry_backoff_max_s,
            pending_sweep_s=self.pending_sweep_s,
        )

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(
            allowed_roots=tuple(self.allowed_roots),
            allowed_buckets=tuple(self.allowed_buckets),
            s3_endpoint_url=self.s3_endpoint_url,
            quarantine_uri=self.quarantine_uri,
            quarantine_action=self.quarantine_action,
        )

    @property
    def http(self) -> HttpSettings:
        return HttpSettings(self.http_timeout_s, tuple(self.http_allowed_networks))

    @property
    def callbacks(self) -> CallbackSettings:
        return CallbackSettings(
            default=self.default_callback,
            redis_url=self.stream_redis_url,
            webhook_secret=self.webhook_secret,
            webhook_retries=self.webhook_retries,
            webhook_timeout_s=self.webhook_timeout_s,
            # modq's and kombu's own: a result published there would corrupt a queue
            reserved_names=(self.queue, self.dead_letter_queue),
            reserved_prefixes=(f"{self.cache_prefix}:",),
        )

    @property
    def endpoints(self) -> EndpointSettings:
        return EndpointSettings(self.s3_endpoint_url, self.stream_redis_url)

    @property
    def metrics(self) -> MetricsSettings:
        return MetricsSettings(self.metrics_port, self.metrics_addr)

    @property
    def logging(self) -> LogSettings:
        return LogSettings(self.log_level, self.log_json)

    @property
    def verdict_db(self) -> Path:
        return self.cache_dir / "verdicts.sqlite3"

    @property
    def onnx_dir(self) -> Path:
        return self.cache_dir / "onnx"


def settings_error(exc: ValidationError) -> ConfigError:
    """One line per refused setting, named as the environment spells it (never its value:
    it may be a secret)."""
    problems = "; ".join(
        f"MODQ_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
        for e in exc.errors(include_url=False)
    )
    return ConfigError(problems)
