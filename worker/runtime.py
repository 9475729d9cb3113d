"""Everything one worker process holds, built once from ``Settings``: the model on its device,
the pipeline and its batcher, the stores, the Redis cache and result store, the publishers.

Knows nothing of Celery beyond the ``send_task`` callable that ``celery://`` callbacks and the
dead-letter queue use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from worker.cache.leases import LeaseKeeper, RedisLeases
from worker.cache.results import ResultStore
from worker.config import Settings
from worker.decodepool import Decoder, build_decoder
from worker.errors import ConfigError
from worker.extras import Extras
from worker.log import get_logger
from worker.optional import missing_extra
from worker.pending import PendingRequests, Sweeper, resend_options
from worker.pipeline import PerceptualOptions, Pipeline, PipelineOptions
from worker.policy import POLICY_NAMES, Policy, load_policy
from worker.service import DeliveryRules, ModerationService

__all__ = ["Runtime", "build_runtime", "close_runtime", "current_runtime", "get_runtime"]

log = get_logger(__name__)

SendTask = Callable[..., Any]


@dataclass
class Runtime:
    settings: Settings
    pipeline: Pipeline
    service: ModerationService
    #: the producers' record of requests on a Redis broker (``None`` on another broker)
    pending: PendingRequests | None = None
    sweeper: Sweeper | None = None
    #: the decode backstop's pool of decoder processes (worker.decodepool)
    decoder: Decoder | None = None

    def start_sweeper(self, send_task: SendTask) -> None:
        """Look for requests the broker lost every ``pending_sweep_s`` (see worker.pending)."""
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
        if self.service.leases is not None:
            self.service.leases.close()
        self.pipeline.close()
        if self.decoder is not None:
            self.decoder.close()


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


def build_runtime(settings: Settings, send_task: SendTask) -> Runtime:
    """Build every part a worker needs before it takes a message; any failure is a
    ``ConfigError`` naming the setting behind it (the worker then exits without consuming)."""
    from worker.cache.redis import RedisCache, redis_client
    from worker.cache.results import RedisResultStore
    from worker.callbacks import build_publisher
    from worker.models.precision import load_model
    from worker.quarantine import build_quarantine
    from worker.storage.router import build_store

    with _building("MODQ_MODEL", settings.model):
        backend = load_model(
            settings.model, settings.device, settings.precision, settings.threads, settings.onnx_dir
        )
    with _building("MODQ_POLICY", settings.policy):
        policy = load_policy(settings.policy, backend.card)
        policies = _policies(settings, policy, backend.card)
    with _building("MODQ_ALLOWED_ROOTS / MODQ_ALLOWED_BUCKETS / MODQ_S3_ENDPOINT_URL"):
        store = build_store(settings)
    cache: RedisCache | None = None
    results: ResultStore | None = None
    leases: LeaseKeeper | None = None
    if settings.cache_url:
        with _building("MODQ_CACHE_URL", settings.cache_url):
            client = redis_client(settings.cache_url)  # one pool: cache, results, leases
            cache = RedisCache.from_settings(settings, client)
            results = RedisResultStore.from_settings(settings, client)
            leases = LeaseKeeper(
                RedisLeases(client, settings.cache_prefix, settings.result_ttl_s),
                settings.lease_ttl_s,
            )
    with _building("MODQ_BANK_URL / MODQ_EMBEDDING_SINK / MODQ_REVIEW_HEATMAPS_URI"):
        extras = Extras.from_settings(settings, backend, banks_until_read=True)
        if extras.banks is not None:
            extras.banks.probe()
    with _building("MODQ_QUARANTINE_URI", settings.quarantine_uri):
        quarantine = build_quarantine(settings, store)
    with _building("MODQ_DEFAULT_CALLBACK / MODQ_CALLBACK_REDIS_URL", settings.default_callback):
        publisher = build_publisher(settings, send_task)
    with _building("MODQ_DECODE_PROCESSES", settings.decode_processes):
        decoder = build_decoder(settings)  # the decode backstop: decoder processes
    pipeline = Pipeline(
        backend,
        store,
        policy,
        cache,
        quarantine,
        replace(PipelineOptions.from_settings(settings), decoder=decoder.decode),
        PerceptualOptions.from_settings(settings),
        extras,
    )
    rules = DeliveryRules(
        max_deliveries=settings.max_deliveries, lease_wait_s=settings.task_time_limit_s
    )
    service = ModerationService(
        pipeline, publisher, results, policies, settings.default_callback, leases, rules
    )
    log.info("worker ready", model=backend.describe(), batch=settings.max_batch_size)
    return Runtime(
        settings, pipeline, service, PendingRequests.from_settings(settings), decoder=decoder
    )


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime(settings: Settings, send_task: SendTask) -> Runtime:
    """This process's runtime, built on first use: the model loads once per process."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(settings, send_task)
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
