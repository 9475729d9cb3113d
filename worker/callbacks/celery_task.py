"""Deliver a result as a Celery task: ``celery://proj.tasks.on_result?queue=results``.

The worker passes its own app's ``send_task``, so this module never imports Celery (and is
tested without it). The task gets one positional argument, the result as a JSON-ready dict,
serialized as JSON: the receiving app needs modq's wire contract, never its code or pickle.
Without ``?queue=`` the task goes to Celery's default queue, ``celery``, where a plain
``celery worker`` of the receiving app consumes: never to the worker's own default queue,
which is modq's request queue, where no consumer can run it. A callback that cannot be routed
(it names one of modq's own queues, or has no ``?queue=`` while ``celery`` is one of them) or
that names any other reserved key (``ReservedNames``: kombu's ``unacked*`` and ``_kombu.*``,
priority sub-queues, modq's key prefix) is refused as ``InvalidCallback``: nothing is handed
to the broker.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

from worker.callbacks.base import ReservedNames, check_name, parse_target
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
    """``reserved`` names the queues a caller may not name (modq's own request and
    dead-letter queues, kombu's keys, modq's key prefix); ``reserved_queues`` adds to it.
    A result sent to modq's queue would be consumed as a moderation request, and one sent to
    a transport key would corrupt it."""

    def __init__(
        self,
        send_task: Callable[..., object],
        reserved_queues: Collection[str] = (),
        default_queue: str = CELERY_DEFAULT_QUEUE,
        reserved: ReservedNames | None = None,
    ) -> None:
        self._send_task = send_task
        base = reserved or ReservedNames()
        self.reserved = ReservedNames((*base.queues, *reserved_queues), base.prefixes)
        self.default_queue = default_queue

    def check(self, uri: str) -> None:
        """``InvalidCallback`` when no result could ever be sent to ``uri``."""
        self._target(uri)

    def _target(self, uri: str) -> tuple[str, str]:
        name, options = parse_target(uri, "celery", options=("queue",))
        queue = options.get("queue", self.default_queue)
        if not queue:
            raise InvalidCallback(f"celery://{name} cannot target queue '' (an empty ?queue=)")
        if queue in self.reserved.queues:
            hint = "" if "queue" in options else " (the default without ?queue=)"
            raise InvalidCallback(
                f"celery://{name} cannot target queue {queue!r}{hint}: it is one of modq's "
                "own, so the result cannot be routed"
            )
        self.reserved.check(queue, f"celery://{name}?queue=")
        check_name(queue, f"celery://{name}?queue=")
        return name, queue

    def publish(self, uri: str, result: ModerationResult) -> None:
        name, queue = self._target(uri)
        payload = result.model_dump(mode="json")
        try:
            self._send_task(name, args=[payload], serializer="json", queue=queue)
        except _transient_errors() as exc:
            raise CallbackFailed(
                f"request {result.request_id}: cannot send task {name!r}: {exc}"
            ) from exc
