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
it is never lost. Once the dead letter is out the original is rejected here (not handed back
to Celery, whose own handling of a message without an ``id`` raises and stops the worker), so
each message gives exactly one dead letter. Messages Celery cannot turn into a task are
dead-lettered too, then removed:

- ``undecodable``: a body or compression Celery cannot decode (broken JSON, an unknown
  ``compression`` header);
- ``content_disallowed``: a content type other than exactly ``application/json`` (pickle,
  which is never unpickled, or ``application/json; charset=utf-8``);
- ``invalid_task``: task headers Celery refuses (an ``eta`` or ``expires`` it cannot read);
- ``malformed_message``: anything else that fails while the message becomes a request (a
  ``task`` header that is not a string, ``modq.moderate`` without an ``id``), caught around
  Celery's handler so that the worker survives it. The letter's ``error`` says what failed.

What never reaches this consumer cannot be dead-lettered here: an envelope kombu cannot
parse on the Redis list (not JSON, ``headers`` not an object, no ``properties``) fails inside
the transport, after ``BRPOP`` took it, and is lost; the first two stop the worker (README,
"Without the Python client").
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from worker import metrics
from worker.log import get_logger
from worker.messages import DEAD_LETTER_TASK

__all__ = [
    "CONTENT_DISALLOWED",
    "INVALID_TASK",
    "MALFORMED_MESSAGE",
    "UNDECODABLE",
    "UNKNOWN_MESSAGE",
    "UNKNOWN_TASK",
    "Consumer",
    "describe",
]

UNKNOWN_TASK = "unknown_task"
UNKNOWN_MESSAGE = "unknown_message"
UNDECODABLE = "undecodable"
CONTENT_DISALLOWED = "content_disallowed"
INVALID_TASK = "invalid_task"
MALFORMED_MESSAGE = "malformed_message"

log = get_logger(__name__)
_celery_log = logging.getLogger(__name__)  # for kombu's reject_log_error


def _jsonable(value: Any) -> Any:
    """Headers and properties as plain JSON (anything else as its repr)."""
    return json.loads(json.dumps(value, default=repr))


def describe(message: Any) -> dict[str, Any]:
    """The raw message as a JSON object: nothing in it is unpickled or interpreted."""
    body = getattr(message, "body", None)
    if isinstance(body, str):
        raw = body.encode()
    elif isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
    else:
        raw = json.dumps(body, default=repr).encode() if body is not None else b""
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    properties = getattr(message, "properties", None)
    if isinstance(properties, dict):
        properties = {k: v for k, v in properties.items() if k != "delivery_info"}
    return {
        "headers": _jsonable(getattr(message, "headers", None) or {}),
        "properties": _jsonable(properties or {}),
        "delivery_info": _jsonable(getattr(message, "delivery_info", None) or {}),
        "content_type": _jsonable(getattr(message, "content_type", None)),
        "content_encoding": _jsonable(getattr(message, "content_encoding", None)),
        "body": text,
        "body_encoding": encoding,
    }


def _request(message: Any) -> Any:
    if getattr(message, "content_type", None) != "application/json":
        return None
    try:
        return json.loads(message.body)
    except (TypeError, ValueError):
        return None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer; every message it would drop or choke on is dead-lettered first.

    After a successful dead letter the message is rejected here (on Redis: removed) and never
    handed back to Celery; when the dead letter cannot be sent it stays unacked, and the
    transport restores it later."""

    #: set when Celery handed the message on as a request (``task_received``): a failure
    #: after that point is Celery's own, not the message's
    _handed_on = False

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            self._handed_on = False
            try:
                headers = getattr(message, "headers", None)
                if isinstance(headers, dict) and not isinstance(headers.get("task", ""), str):
                    # Celery would look the list or object up in its task table: TypeError.
                    raise TypeError(f"the task header is a {type(headers['task']).__name__}")
                return handler(message)
            except Exception as exc:
                if self._handed_on:
                    raise
                self._refuse(message, MALFORMED_MESSAGE, exc)
                return None

        return on_task_received

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse(message, UNKNOWN_TASK, None)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, UNKNOWN_MESSAGE, None)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = CONTENT_DISALLOWED if isinstance(exc, ContentDisallowed) else INVALID_TASK
        self._refuse(message, reason, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = CONTENT_DISALLOWED if isinstance(exc, ContentDisallowed) else UNDECODABLE
        self._refuse(message, reason, exc)

    def _refuse(self, message: Any, reason: str, exc: Exception | None) -> None:
        """Dead-letter ``message``, then remove it; never raises (a failure here would stop
        the worker with the message restored: a poison message)."""
        try:
            if not self._dead_letter(message, reason, exc):
                return
            reject = getattr(message, "reject_log_error", None)
            if reject is None:  # not a kombu message: nothing to remove
                return
            reject(_celery_log, self.connection_errors)
        except Exception:
            log.exception("a refused message could not be dead-lettered", reason=reason)

    def _dead_letter(self, message: Any, reason: str, error: Exception | None = None) -> bool:
        """Hand the message to the dead-letter queue; whether the original may now go."""
        headers = getattr(message, "headers", None)
        headers = headers if isinstance(headers, dict) else {}
        settings = getattr(self.app.conf, "modq_settings", None)
        queue = getattr(settings, "dead_letter_queue", "modq.dead")
        letter = {
            "reason": reason,
            "request": _request(message),
            "result": None,
            "message": describe(message),
        }
        if error is not None:
            letter["error"] = f"{type(error).__name__}: {error}"[:2000]
        task, task_id = _jsonable(headers.get("task")), _jsonable(headers.get("id"))
        try:
            self.app.send_task(DEAD_LETTER_TASK, args=[letter], queue=queue, serializer="json")
        except Exception as exc:
            log.error(
                "dead letter not sent; the message stays unacked until the transport restores it",
                reason=reason,
                task=task,
                task_id=task_id,
                error=repr(exc),
            )
            return False
        metrics.DEAD_LETTERS.labels(reason).inc()
        log.warning(
            "dead-lettered a message that is no modq request",
            reason=reason,
            task=task,
            task_id=task_id,
            queue=queue,
            error=letter.get("error"),
        )
        return True


@signals.task_received.connect  # type: ignore[untyped-decorator]
def _handed_on(sender: Any = None, **_: Any) -> None:
    if isinstance(sender, Consumer):
        sender._handed_on = True
