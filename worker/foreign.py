"""Messages on modq's queue that are not ``modq.moderate`` tasks: dead-lettered, not dropped.

Celery's consumer logs a message naming a task this worker does not know ("Received
unregistered task") and rejects it, which on Redis deletes it: a producer that misspelt the
task name, or a result routed to the wrong queue, would vanish. ``Consumer`` (installed as
``worker_consumer``) first sends each such message to the dead-letter queue as a
``modq.dead_letter`` task carrying ``{reason, request, result: null, message}``, and only
once the broker took it lets Celery reject the original:

- ``unknown_task``: Celery task headers naming another task;
- ``unknown_message``: no Celery task headers at all (not protocol 2, nor 1).

``message`` keeps what a person needs to replay or trace it: headers, properties, delivery
info, content type and the body (text, or base64 when it is not UTF-8). ``request`` is the
body decoded from JSON when it is JSON. A dead letter that cannot be sent leaves the original
unacked: the transport restores it (at the visibility timeout, or when the worker stops), so
it is never lost. Bodies Celery cannot decode (pickle, which ``accept_content`` refuses, or
broken JSON under task headers) are still refused by Celery itself and logged.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from worker import metrics
from worker.celery_app import DEAD_LETTER_TASK
from worker.log import get_logger

__all__ = ["UNKNOWN_MESSAGE", "UNKNOWN_TASK", "Consumer", "describe"]

UNKNOWN_TASK = "unknown_task"
UNKNOWN_MESSAGE = "unknown_message"

log = get_logger(__name__)


def _jsonable(value: Any) -> Any:
    """Headers and properties as plain JSON (anything else as its repr)."""
    return json.loads(json.dumps(value, default=repr))


def describe(message: Any) -> dict[str, Any]:
    """The raw message as a JSON object: nothing in it is unpickled or interpreted."""
    body = message.body
    raw = body.encode() if isinstance(body, str) else bytes(body or b"")
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return {
        "headers": _jsonable(message.headers or {}),
        "properties": _jsonable(
            {k: v for k, v in (message.properties or {}).items() if k != "delivery_info"}
        ),
        "delivery_info": _jsonable(message.delivery_info or {}),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "body": text,
        "body_encoding": encoding,
    }


def _request(message: Any) -> Any:
    if message.content_type != "application/json":
        return None
    try:
        return json.loads(message.body)
    except (TypeError, ValueError):
        return None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self._dead_letter(message, UNKNOWN_TASK):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self._dead_letter(message, UNKNOWN_MESSAGE):
            super().on_unknown_message(body, message)

    def _dead_letter(self, message: Any, reason: str) -> bool:
        """Hand the message to the dead-letter queue; whether the original may now go."""
        headers = message.headers or {}
        settings = getattr(self.app.conf, "modq_settings", None)
        queue = getattr(settings, "dead_letter_queue", "modq.dead")
        letter = {
            "reason": reason,
            "request": _request(message),
            "result": None,
            "message": describe(message),
        }
        try:
            self.app.send_task(DEAD_LETTER_TASK, args=[letter], queue=queue, serializer="json")
        except Exception as exc:
            log.error(
                "dead letter not sent; the message stays unacked until the transport restores it",
                reason=reason,
                task=headers.get("task"),
                task_id=headers.get("id"),
                error=repr(exc),
            )
            return False
        metrics.DEAD_LETTERS.labels(reason).inc()
        log.warning(
            "dead-lettered a message that is no modq request",
            reason=reason,
            task=headers.get("task"),
            task_id=headers.get("id"),
            queue=queue,
        )
        return True
