"""Deliver a result as a Celery task: ``celery://proj.tasks.on_result?queue=results``.

The worker passes its own app's ``send_task``, so this module never imports Celery (and is
tested without it). The task gets one positional argument, the result as a JSON-ready dict,
serialized as JSON: the receiving app needs modq's wire contract, never its code or pickle.
Without ``?queue=`` Celery's own routing applies (``task_routes``, else the default queue).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

from worker.callbacks.base import parse_target
from worker.errors import CallbackFailed, InvalidCallback
from worker.messages import ModerationResult

__all__ = ["CeleryPublisher"]


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    """What a broker raises when it is down or slow; imported late, Celery being loaded."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (OperationalError, RedisConnectionError, RedisTimeoutError, OSError)


class CeleryPublisher:
    """``reserved_queues`` are queues a caller may not name (modq's own request and
    dead-letter queues): a result sent there would be consumed as a moderation request."""

    def __init__(
        self, send_task: Callable[..., object], reserved_queues: Collection[str] = ()
    ) -> None:
        self._send_task = send_task
        self.reserved_queues = frozenset(reserved_queues)

    def publish(self, uri: str, result: ModerationResult) -> None:
        name, options = parse_target(uri, "celery", options=("queue",))
        queue = options.get("queue")
        routing: dict[str, str] = {}
        if queue is not None:
            if not queue or queue in self.reserved_queues:
                raise InvalidCallback(f"celery:// cannot target queue {queue!r}")
            routing["queue"] = queue
        payload = result.model_dump(mode="json")
        try:
            self._send_task(name, args=[payload], serializer="json", **routing)
        except _transient_errors() as exc:
            raise CallbackFailed(
                f"request {result.request_id}: cannot send task {name!r}: {exc}"
            ) from exc
