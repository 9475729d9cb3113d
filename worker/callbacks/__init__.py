"""Publishers: how each ``ModerationResult`` reaches the callback its request named.

One seam, ``Publisher.publish(uri, result)``, with a publisher per scheme: ``celery://`` (a
task by name on a queue), ``redis-stream://`` (a stream on the operator's Redis) and
``https://`` (a signed webhook). ``CallbackRouter`` picks by scheme; ``MemoryPublisher`` is
the fake. Every publisher raises ``CallbackFailed`` (retryable: the task retries, then
dead-letters) or ``InvalidCallback``, which no retry fixes. A scheme the operator has not
configured (no webhook secret, a broker that is not Redis) is an ``InvalidCallback`` too, so
the task dead-letters the result; its message names the setting, and the worker says so once
at start.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from worker.callbacks.base import (
    CallbackRouter,
    LazyPublisher,
    MemoryPublisher,
    Publisher,
    RefusingPublisher,
    ReservedNames,
    answer_id,
    delivery_id,
    parse_target,
)
from worker.callbacks.celery_task import CeleryPublisher
from worker.callbacks.redis_stream import DEFAULT_STREAM_MAXLEN, RedisStreamPublisher, StreamClient
from worker.callbacks.webhook import (
    WebhookPublisher,
    sign,
    sign_standard,
    signing_key,
    verify_signature,
)
from worker.config import CallbackSettings, HttpSettings
from worker.errors import InvalidCallback
from worker.log import get_logger
from worker.storage.netguard import NetworkGuard

__all__ = [
    "DEFAULT_STREAM_MAXLEN",
    "REDIS_TIMEOUT_S",
    "CallbackRouter",
    "CeleryPublisher",
    "LazyPublisher",
    "MemoryPublisher",
    "Publisher",
    "RedisStreamPublisher",
    "RefusingPublisher",
    "ReservedNames",
    "StreamClient",
    "WebhookPublisher",
    "answer_id",
    "build_publisher",
    "delivery_id",
    "parse_target",
    "redis_stream_client",
    "reserved_names",
    "sign",
    "sign_standard",
    "signing_key",
    "verify_signature",
]

REDIS_TIMEOUT_S = 5.0
_REDIS_SCHEMES = ("redis", "rediss", "unix")

log = get_logger(__name__)


def redis_stream_client(url: str) -> StreamClient:
    """A ``redis.Redis`` for ``url``; it connects on first command, not here."""
    from worker.redisclient import redis_client

    try:
        client: StreamClient = redis_client(url, REDIS_TIMEOUT_S, health_check_s=30)
    except ValueError as exc:
        # The URL may hold a password: name the setting, not the value.
        raise InvalidCallback(f"MODQ_CALLBACK_REDIS_URL is not a valid Redis URL: {exc}") from exc
    return client


def reserved_names(callbacks: CallbackSettings) -> ReservedNames:
    """What no callback may write to, on the broker or the callback Redis: modq's request
    and dead-letter queues, kombu's keys (always) and every key under ``{cache_prefix}:``."""
    return ReservedNames(callbacks.reserved_names, callbacks.reserved_prefixes)


def build_publisher(
    callbacks: CallbackSettings,
    http: HttpSettings,
    send_task: Callable[..., object] | None = None,
    redis_client_factory: Callable[[str], StreamClient] = redis_stream_client,
) -> CallbackRouter:
    """The router for a worker: ``send_task`` is the Celery app's (``None`` where there is
    no broker, as in ``scan``); the stream client is made on the first stream callback."""
    celery = None
    reserved = reserved_names(callbacks)
    if send_task is not None:
        celery = CeleryPublisher(send_task, reserved=reserved)
    return CallbackRouter(
        celery=celery,
        redis_stream=_stream_publisher(callbacks, redis_client_factory, reserved),
        webhook=_webhook_publisher(callbacks, http),
    )


def _webhook_publisher(callbacks: CallbackSettings, http: HttpSettings) -> Publisher:
    secret = callbacks.webhook_secret.get_secret_value() if callbacks.webhook_secret else ""
    if not secret:
        reason = (
            "webhook callbacks are disabled: this worker has no signing secret "
            "(the operator sets MODQ_WEBHOOK_SECRET)"
        )
        log.info(reason)
        return RefusingPublisher(reason)
    return WebhookPublisher(
        NetworkGuard(http.allowed_networks),
        secret,
        retries=callbacks.webhook_retries,
        timeout_s=callbacks.webhook_timeout_s,
    )


def _stream_publisher(
    callbacks: CallbackSettings, factory: Callable[[str], StreamClient], reserved: ReservedNames
) -> Publisher:
    url = callbacks.redis_url
    scheme = urlsplit(url).scheme
    if scheme not in _REDIS_SCHEMES:
        # Only the scheme is named: the URL may carry a password.
        reason = (
            f"redis-stream:// callbacks are disabled: the broker ({scheme}://) is not Redis "
            "(the operator sets MODQ_CALLBACK_REDIS_URL)"
        )
        log.info(reason)
        return RefusingPublisher(reason)
    return LazyPublisher(lambda: RedisStreamPublisher(factory(url), reserved=reserved))
