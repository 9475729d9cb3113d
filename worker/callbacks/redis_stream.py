"""Deliver a result to a Redis stream: ``redis-stream://moderation:results``.

Each result is one entry ``XADD <stream> MAXLEN ~ <cap> * result <json> request_id <id>``;
consumers read it with a consumer group and dedupe re-deliveries by ``request_id``.

The URI names a stream only, never a server: it comes from an untrusted request, so every
stream lives on the Redis the operator configured (``MODQ_CALLBACK_REDIS_URL``, else the
broker). The approximate cap (``MAXLEN ~``, default 100 000 entries) bounds memory when no
one consumes: Redis trims whole internal nodes, so a stream keeps at least the cap and a
little more, and entries past it are dropped oldest first.

A stream may not be named after a key modq or kombu keep on that Redis (``ReservedNames``:
modq's queues, ``unacked*``, ``_kombu.*``, anything under modq's key prefix): an ``XADD``
there would turn the request queue or the dead-letter list into a stream. Such a callback is
an ``InvalidCallback``; nothing is written.
"""

from __future__ import annotations

from typing import Protocol

from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from worker.callbacks.base import ReservedNames, parse_target
from worker.errors import CallbackFailed, InvalidCallback
from worker.messages import ModerationResult

__all__ = ["DEFAULT_STREAM_MAXLEN", "RedisStreamPublisher", "StreamClient"]

DEFAULT_STREAM_MAXLEN = 100_000


class StreamClient(Protocol):
    """The one command of ``redis.Redis`` this publisher uses."""

    def xadd(
        self, name: str, fields: dict[FieldT, EncodableT], *, maxlen: int | None, approximate: bool
    ) -> object: ...


class RedisStreamPublisher:
    def __init__(
        self,
        client: StreamClient,
        maxlen: int | None = DEFAULT_STREAM_MAXLEN,
        reserved: ReservedNames | None = None,
    ) -> None:
        self.client = client
        self.maxlen = maxlen
        self.reserved = reserved or ReservedNames()

    def check(self, uri: str) -> None:
        """``InvalidCallback`` when no result could ever be added to ``uri``'s stream."""
        self._stream(uri)

    def _stream(self, uri: str) -> str:
        stream, _ = parse_target(uri, "redis-stream")
        self.reserved.check(stream, "redis-stream://")
        return stream

    def publish(self, uri: str, result: ModerationResult) -> None:
        stream = self._stream(uri)
        fields: dict[FieldT, EncodableT] = {
            "result": result.model_dump_json(),
            "request_id": result.request_id,
        }
        try:
            self.client.xadd(stream, fields, maxlen=self.maxlen, approximate=True)
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise InvalidCallback(f"{stream!r} exists and is not a stream") from exc
            raise CallbackFailed(f"request {result.request_id}: XADD {stream!r}: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise CallbackFailed(f"request {result.request_id}: XADD {stream!r}: {exc}") from exc
