"""Deliver a result as a Celery task: ``celery://proj.tasks.on_result?queue=results``.

The worker passes its own app's ``send_task``, so this module never imports Celery (and is
tested without it). The task gets one positional argument, the result as a JSON-ready dict,
serialized as JSON: the receiving app needs modq's wire contract, never its code or pickle.
Without ``?queue=`` the task goes to Celery's default queue, ``celery``, where a plain
``celery worker`` of the receiving app consumes: never to the worker's own default queue,
which is modq's request queue, where no consumer can run it. A callback that cannot be routed
(it names one of modq's own queues, or has no ``?queue=`` while ``celery`` is one of them) is
refused as ``InvalidCallback``: nothing is handed to the broker.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

from worker.callbacks.base import parse_target
from worker.errors import CallbackFailed, InvalidCallback
from worker.messages import ModerationResult

__all__ = ["CELERY_DEFAULT_QUEUE", "CeleryPublisher"]

#: Celery's own ``task_default_queue``: what a receiving app consumes unless told otherwise
CELERY_DEFAULT_QUEUE = "celery"


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
        self,
        send_task: Callable[..., object],
        reserved_queues: Collection[str] = (),
        default_queue: str = CELERY_DEFAULT_QUEUE,
    ) -> None:
        self._send_task = send_task
        self.reserved_queues = frozenset(reserved_queues)
        self.default_queue = default_queue

    def publish(self, uri: str, result: ModerationResult) -> None:
        name, options = parse_target(uri, "celery", options=("queue",))
        queue = options.get("queue", self.default_queue)
        if queue in self.reserved_queues:
            hint = "" if "queue" in options else " (the default without ?queue=)"
            raise InvalidCallback(
                f"celery://{name} cannot target queue {queue!r}{hint}: it is one of modq's "
                "own, so the result cannot be routed"
            )
        if not queue:
            raise InvalidCallback(f"celery://{name} cannot target queue '' (an empty ?queue=)")
        payload = result.model_dump(mode="json")
        try:
            self._send_task(name, args=[payload], serializer="json", queue=queue)
        except _transient_errors() as exc:
            raise CallbackFailed(
                f"request {result.request_id}: cannot send task {name!r}: {exc}"
            ) from exc
