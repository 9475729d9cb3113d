"""The producer API: enqueue moderation requests for the workers.

    from worker.queue.client import submit
    request_id = submit("s3://uploads/cat.jpg", callback="redis-stream://moderation-results")

Importing this module imports neither torch, timm, transformers nor boto3, reads no
environment and builds no Celery app: producers install modq to enqueue, not to infer. A
``Client`` reads only ``ProducerSettings`` (the broker, the queue, the key prefix), so a
variable only the worker uses cannot stop a producer. Requests are validated here, before
they reach the broker, by the same pydantic model the worker uses.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from worker.config import ProducerSettings
from worker.messages import MODERATE_TASK, ModerationRequest
from worker.queue.sweep import PendingRequests, kept_options

__all__ = ["Client", "new_request_id", "producer_config", "submit"]


def new_request_id() -> str:
    return uuid.uuid4().hex


def producer_config(settings: ProducerSettings) -> dict[str, Any]:
    """The Celery configuration a producer needs, which the worker's app extends."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": dict(settings.broker_transport_options),
        "result_backend": None,  # results go to each request's callback, not to Celery
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_send_sent_event": True,  # Flower shows a request from when it was sent
    }


class Client:
    """A producer bound to one broker; reuse it (it keeps a connection pool)."""

    def __init__(
        self, settings: ProducerSettings | None = None, *, broker_url: str | None = None
    ) -> None:
        settings = settings or ProducerSettings()
        if broker_url is not None:
            settings = settings.model_copy(update={"broker_url": broker_url})
        self.settings = settings
        self.app = Celery("modq-producer", set_as_current=False)
        self.app.conf.update(producer_config(settings))
        self.pending = PendingRequests.from_settings(settings)

    def request(
        self,
        image: str,
        *,
        callback: str | None = None,
        policy: str | None = None,
        request_id: str | None = None,
        embed: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> ModerationRequest:
        return ModerationRequest(
            request_id=request_id or new_request_id(),
            image=image,
            callback=callback,
            policy=policy,
            embed=embed,
            metadata=metadata or {},
        )

    def send(self, request: ModerationRequest, **options: Any) -> str:
        """Enqueue one validated request; returns its ``request_id``. On a Redis broker the
        request is recorded first, so a worker can re-send it if the transport loses it."""
        message = request.model_dump(mode="json", exclude_defaults=True)
        if self.pending is not None:
            try:
                self.pending.record(request.request_id, message, kept_options(options))
            except redis.RedisError as exc:
                raise OperationalError(f"cannot record the request on the broker: {exc}") from exc
        try:
            self.app.send_task(
                MODERATE_TASK,
                args=[message],
                queue=self.settings.queue,
                task_id=request.request_id,
                **options,
            )
        except Exception:
            # The caller is told it failed: a re-send must not deliver it behind its back.
            if self.pending is not None:
                with contextlib.suppress(redis.RedisError):
                    self.pending.forget(request.request_id)
            raise
        return request.request_id

    def send_many(self, requests: Iterable[ModerationRequest]) -> Iterator[ModerationRequest]:
        """Enqueue a stream of requests over one connection, one at a time (bounded memory);
        yields each request once it is on the broker."""
        with self.app.producer_or_acquire() as producer:
            for request in requests:
                self.send(request, producer=producer)
                yield request

    def submit(self, image: str, **fields: Any) -> str:
        return self.send(self.request(image, **fields))

    def close(self) -> None:
        if self.pending is not None:
            self.pending.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def submit(
    image: str,
    *,
    callback: str | None = None,
    policy: str | None = None,
    request_id: str | None = None,
    embed: bool = False,
    metadata: dict[str, str] | None = None,
    broker_url: str | None = None,
) -> str:
    """Enqueue one image for moderation; returns the request id (the idempotency key)."""
    with Client(broker_url=broker_url) as client:
        return client.submit(
            image,
            callback=callback,
            policy=policy,
            request_id=request_id,
            embed=embed,
            metadata=metadata,
        )
