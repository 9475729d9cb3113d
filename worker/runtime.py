"""The composition root: everything one process holds, built once from ``Settings``. The
model on its device with its batcher, the stores, the verdict cache, the hash banks, the
actions (quarantine, heatmaps, embedding sink), and in queue mode the result store, the
leases, the publishers and the service.

Every front end builds its runtime here and passes only what differs: ``modq scan`` its
folder store, its embedded SQLite cache and its quarantine folder; the queue worker the
``send_task`` that ``celery://`` callbacks and the dead-letter queue use; ``modq calibrate``
and ``modq similar`` no cache, no quarantine and no extras. No other module wires the
pipeline or loads the model. Knows nothing of Celery beyond ``send_task``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Final

from worker.actions import Actions
from worker.banks.gate import BankGate
from worker.cache import VerdictCache
from worker.cache.leases import LeaseKeeper, RedisLeases
from worker.cache.results import ResultStore
from worker.callbacks import Publisher
from worker.config import Settings
from worker.decode.pool import Decoder, build_decoder
from worker.errors import ConfigError
from worker.log import get_logger
from worker.models.backend import Backend
from worker.optional import missing_extra
from worker.pipeline import PerceptualOptions, Pipeline, PipelineOptions
from worker.policy import POLICY_NAMES, Policy, load_policy
from worker.quarantine import Quarantine
from worker.queue.service import DeliveryRules, ModerationService
from worker.queue.sweep import PendingRequests, Sweeper, resend_options
from worker.storage import ObjectStore

__all__ = [
    "FROM_SETTINGS",
    "Runtime",
    "build_runtime",
    "close_runtime",
    "current_runtime",
    "get_runtime",
]

log = get_logger(__name__)

SendTask = Callable[..., Any]


class _FromSettings:
    def __repr__(self) -> str:
        return "FROM_SETTINGS"


#: a part of the runtime built as the settings say (the default of every choice)
FROM_SETTINGS: Final = _FromSettings()


@dataclass
class Runtime:
    settings: Settings
    backend: Backend
    pipeline: Pipeline
    #: the policies a request may name (the configured one under its own name too)
    policies: dict[str, Policy]
    #: the decode backstop's pool of decoder processes (worker.decode.pool)
    decoder: Decoder
    #: queue mode: stored results, leases, publishers
    service: ModerationService | None = None
    #: the producers' record of requests on a Redis broker (``None`` on another broker)
    pending: PendingRequests | None = None
    sweeper: Sweeper | None = None

    def start_sweeper(self, send_task: SendTask) -> None:
        """Look for requests the broker lost every ``pending_sweep_s`` (see worker.queue.sweep)."""
        if self.pending is None or self.sweeper is not None:
            return
        from worker.messages import MODERATE_TASK

        queue = self.settings.queue

        def resend(request_id: str, message: dict[str, Any], options: dict[str, Any]) -> None:
            send_task(
                MODERATE_TASK,
                args=[message],
                queue=queue,
                task_id=request_id,
                **resend_options(options),
            )

        self.sweeper = Sweeper(self.pending, resend, self.settings.pending_sweep_s)
        self.sweeper.start()

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.pending is not None:
            self.pending.close()
        if self.service is not None and self.service.leases is not None:
            self.service.leases.close()
        self.pipeline.close()
        close = getattr(self.pipeline.cache, "close", None)
        if close is not None:
            close()
        self.decoder.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _policies(settings: Settings, pipeline_policy: Policy, card: Any) -> dict[str, Policy]:
    policies = {name: load_policy(name, card) for name in POLICY_NAMES}
    policies[pipeline_policy.name] = pipeline_policy
    return policies


@contextmanager
def _building(setting: str, value: object = None) -> Iterator[None]:
    """Name the setting behind whatever fails while one part of the runtime is built."""
    named = setting if value is None else f"{setting}={value}"
    try:
        yield
    except ConfigError as exc:
        if named in str(exc):
            raise
        raise ConfigError(f"{named}: {exc}") from exc
    except ImportError as exc:
        raise ConfigError(f"{named}: {missing_extra(exc) or exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{named}: {type(exc).__name__}: {exc}") from exc


def build_runtime(
    settings: Settings,
    *,
    store: ObjectStore | None = None,
    cache: VerdictCache | _FromSettings | None = FROM_SETTINGS,
    quarantine: Quarantine | _FromSettings | None = FROM_SETTINGS,
    extras: bool = True,
    embed: bool = False,
    send_task: SendTask | None = None,
) -> Runtime:
    """Build every part before the first image; any failure is a ``ConfigError`` naming the
    setting behind it (a worker then exits without consuming). ``store``: the references'
    store (default: every scheme the settings allow); ``cache`` and ``quarantine``: given, or
    as the settings say; ``extras``: the hash banks, embedding sink and review heatmaps the
    settings name; ``send_task``: queue mode (a service with its result store, leases and
    publishers)."""
    from worker.models.precision import load_model

    with _building("MODQ_MODEL", settings.model):
        backend = load_model(
            settings.model, settings.device, settings.precision, settings.threads, settings.onnx_dir
        )
    with _building("MODQ_POLICY", settings.policy):
        policy = load_policy(settings.policy, backend.card)
        policies = _policies(settings, policy, backend.card)
    if store is None:
        from worker.storage.router import build_store

        with _building("MODQ_ALLOWED_ROOTS / MODQ_ALLOWED_BUCKETS / MODQ_S3_ENDPOINT_URL"):
            store = build_store(settings.storage, settings.http)
    queue = _QueueParts.build(settings, send_task) if send_task is not None else None
    if isinstance(cache, _FromSettings):
        cache = queue.cache if queue is not None else None
    banks, actions = _extras(settings, backend, queue is not None) if extras else (None, Actions())
    if isinstance(quarantine, _FromSettings):
        from worker.quarantine import build_quarantine

        with _building("MODQ_QUARANTINE_URI", settings.quarantine_uri):
            quarantine = build_quarantine(settings.storage, store)
    actions.quarantine = quarantine
    with _building("MODQ_DECODE_PROCESSES", settings.decode_processes):
        decoder = build_decoder(settings.decode)  # the decode backstop: decoder processes
    pipeline = Pipeline(
        backend,
        store,
        policy,
        cache=cache,
        banks=banks,
        actions=actions,
        options=replace(
            PipelineOptions.from_settings(settings.decode, settings.batching, embed),
            decoder=decoder.prepare,
        ),
        perceptual=PerceptualOptions.from_settings(settings.cache),
    )
    runtime = Runtime(settings, backend, pipeline, policies, decoder)
    if queue is not None:
        runtime.service = queue.service(pipeline, policies)
        runtime.pending = PendingRequests.from_settings(settings)
        log.info("worker ready", model=backend.describe(), batch=settings.max_batch_size)
    return runtime


def _extras(
    settings: Settings, backend: Backend, banks_until_read: bool
) -> tuple[BankGate | None, Actions]:
    """The hash banks, and the actions beside quarantine, each off unless configured.
    ``banks_until_read``: images wait for the bank list until it has been read once."""
    with _building("MODQ_BANK_URL"):  # a URL may hold a password: named, not shown
        banks = BankGate.from_settings(settings.banks, until_read=banks_until_read)
        if banks is not None:
            banks.probe()  # banks that must be read and cannot be: refuse to start at all
    sink = heatmaps = None
    if settings.embedding_sink:
        from worker.embeddings import open_sink

        with _building("MODQ_EMBEDDING_SINK", settings.embedding_sink):
            sink = open_sink(settings.embedding_sink, settings.endpoints)
    if settings.review_heatmaps_uri:
        from worker.explain.attach import ReviewHeatmaps
        from worker.models.factory import create_backend

        def fp32() -> Backend:  # for a backend no explainer can open (an ONNX export of a ViT)
            return create_backend(settings.model, settings.device, "fp32", settings.threads)

        with _building("MODQ_REVIEW_HEATMAPS_URI", settings.review_heatmaps_uri):
            heatmaps = ReviewHeatmaps.build(
                settings.review_heatmaps_uri,
                backend,
                fp32,
                settings.decode.limits,
                settings.s3_endpoint_url,
            )
    return banks, Actions(heatmaps=heatmaps, sink=sink)


@dataclass
class _QueueParts:
    """What queue mode adds: one Redis pool for the cache, the stored results and the
    leases, and the publishers."""

    settings: Settings
    publisher: Publisher
    cache: VerdictCache | None = None
    results: ResultStore | None = None
    leases: LeaseKeeper | None = None

    @classmethod
    def build(cls, settings: Settings, send_task: SendTask) -> _QueueParts:
        """Before the pipeline's threads and the decoder processes: a part that fails here
        leaves nothing running."""
        from worker.callbacks import build_publisher

        with _building("MODQ_DEFAULT_CALLBACK / MODQ_CALLBACK_REDIS_URL"):
            publisher = build_publisher(settings.callbacks, settings.http, send_task)
        parts = cls(settings, publisher)
        if settings.cache_url:
            from worker.cache.redis import RedisCache
            from worker.cache.results import RedisResultStore
            from worker.redisclient import redis_client

            with _building("MODQ_CACHE_URL"):  # a URL may hold a password: named, not shown
                client = redis_client(settings.cache_url)  # one pool: cache, results, leases
                parts.cache = RedisCache.from_settings(settings.cache, client)
                results = RedisResultStore.from_settings(settings.cache, client)
                parts.results = results
                parts.leases = LeaseKeeper(
                    RedisLeases(results, settings.result_ttl_s), settings.lease_ttl_s
                )
        return parts

    def service(self, pipeline: Pipeline, policies: dict[str, Policy]) -> ModerationService:
        settings = self.settings
        delivery = settings.delivery
        rules = DeliveryRules(
            max_deliveries=delivery.max_deliveries, lease_wait_s=delivery.task_time_limit_s
        )
        return ModerationService(
            pipeline,
            self.publisher,
            self.results,
            policies,
            settings.default_callback,
            self.leases,
            rules,
        )


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime(settings: Settings, send_task: SendTask) -> Runtime:
    """This worker process's runtime, built on first use: the model loads once per process."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(settings, send_task=send_task)
        return _runtime


def current_runtime() -> Runtime | None:
    """This process's runtime if it was built, without building it."""
    return _runtime


def close_runtime() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
