"""Requests on their way through a Redis broker, so that none is lost in the transport's gap.

Celery's Redis transport pops a message (``BRPOP``) before it records it as unacked: a worker
killed in between, or a connection cut while the reply is in flight, loses the message before
any task saw it (celery/kombu#305). No acknowledgement can bring it back, so modq keeps its
own record:

    producer ── record (seq from the server) ──▶ LPUSH queue ──▶ BRPOP ──▶ unacked ──▶ task
                                                                                       │
    sweeper ◀── recorded, not queued, not unacked, no stored result ◀── forget ◀── published

- ``Client.send`` records each request under a sequence number the broker Redis hands out,
  with its message, before it enqueues it;
- the task forgets it once the result is published, before the message is acked;
- one worker at a time sweeps (a Redis lock): a request recorded before the oldest message
  still in the queue (the queue is first in, first out, so it has been popped), not unacked,
  with no stored result, seen so in two sweeps in a row, is re-sent from its record.

A re-send is harmless: the first stored result wins and a re-delivery re-publishes it, so the
worst a wrong guess costs is a second identical result. Retries renew the sequence number
before they are published, so a retry waiting behind a backlog is not taken for lost.

Redis keys (broker database): ``{prefix}:v1:pending:{queue}`` (sorted set, request id by
sequence), ``…:{queue}:messages`` (hash, request id to message JSON), ``…:{queue}:sweeper``
(the lock) and ``{prefix}:v1:pending:seq``. The set and hash empty as requests finish.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import LockError

from worker import metrics
from worker.config import Settings
from worker.log import get_logger

__all__ = ["PendingRequests", "SweepReport", "Sweeper", "message_task_id"]

log = get_logger(__name__)

#: kombu's Redis transport: one list per priority step, the name joined by this separator.
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEPARATOR = "\x06\x16"
#: how many of the oldest queued messages to read looking for one this record knows
_TAIL = 16

_RECORD = """
local seq = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return seq
"""
_RENEW = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], seq, ARGV[1])
  return seq
end
return false
"""


def message_task_id(raw: str | bytes) -> str | None:
    """The Celery task id of a message as kombu keeps it in a queue list (the payload) or
    in the unacked hash (``[payload, exchange, routing_key]``)."""
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):
            payload = payload[0]
        task_id = payload["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return task_id if isinstance(task_id, str) else None


class PendingRequests:
    """The record of one queue's requests between ``Client.send`` and their result."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        queue: str,
        transport_options: Mapping[str, Any] | None = None,
    ) -> None:
        options = transport_options or {}
        kombu_prefix = str(options.get("global_keyprefix", ""))
        self.client = client
        self.queue = queue
        self.key = f"{prefix}:v1:pending:{queue}"
        self.messages_key = f"{self.key}:messages"
        self.lock_key = f"{self.key}:sweeper"
        self.seq_key = f"{prefix}:v1:pending:seq"
        self.queue_keys = [
            kombu_prefix + (f"{queue}{_PRIORITY_SEPARATOR}{step}" if step else queue)
            for step in _PRIORITY_STEPS
        ]
        self.unacked_key = kombu_prefix + str(options.get("unacked_key", "unacked"))
        self._record = client.register_script(_RECORD)
        self._renew = client.register_script(_RENEW)

    @classmethod
    def from_settings(cls, settings: Settings) -> PendingRequests | None:
        """The record on the broker Redis; ``None`` for another broker (AMQP acknowledges a
        message only once it was delivered, so it has no such gap) or with the sweep off."""
        if settings.pending_sweep_s <= 0 or not settings.broker_url.startswith(
            ("redis://", "rediss://")
        ):
            return None
        client = redis.Redis.from_url(
            settings.broker_url,
            socket_connect_timeout=10,
            socket_timeout=10,
            decode_responses=True,
        )
        return cls(client, settings.cache_prefix, settings.queue, settings.broker_transport_options)

    def close(self) -> None:
        self.client.close()

    def record(self, request_id: str, message: Mapping[str, Any]) -> int:
        """Note a request about to be enqueued; returns its sequence number."""
        seq = self._record(
            keys=[self.key, self.messages_key, self.seq_key],
            args=[request_id, json.dumps(message, separators=(",", ":"))],
        )
        return int(seq)

    def renew(self, request_id: str) -> int | None:
        """Give a recorded request a new sequence number, as it is enqueued again (a retry,
        a re-send); ``None`` when it is not recorded."""
        seq = self._renew(keys=[self.key, self.seq_key], args=[request_id])
        return None if seq is None else int(seq)

    def forget(self, request_id: str) -> None:
        """The request's result is published: nothing left to watch."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.key, request_id)
            pipe.hdel(self.messages_key, request_id)
            pipe.execute()

    def message(self, request_id: str) -> dict[str, Any] | None:
        text = self.client.hget(self.messages_key, request_id)
        return None if text is None else dict(json.loads(text))

    def count(self) -> int:
        return int(self.client.zcard(self.key))

    def horizon(self) -> float | None:
        """The sequence number below which every recorded request has left the queue: that
        of the oldest queued message this record knows, or the next number when the queue
        is empty. ``None`` when none of the oldest queued messages is recorded (sent by
        another producer), so nothing can be told this time."""
        next_seq = int(self.client.get(self.seq_key) or 0) + 1
        oldest: float | None = None
        with self.client.pipeline(transaction=False) as pipe:
            for key in self.queue_keys:
                pipe.lrange(key, -_TAIL, -1)
            tails: list[list[str]] = pipe.execute()
        for tail in tails:
            if not tail:
                continue
            seq = self._first_recorded(reversed(tail))  # the list's tail is popped first
            if seq is None:
                return None
            oldest = seq if oldest is None else min(oldest, seq)
        return float(next_seq) if oldest is None else oldest

    def _first_recorded(self, raws: Any) -> float | None:
        for raw in raws:
            task_id = message_task_id(raw)
            if task_id is None:
                continue
            seq = self.client.zscore(self.key, task_id)
            if seq is not None:
                return float(seq)
        return None

    def recorded_before(self, seq: float, limit: int = 1000) -> list[tuple[str, float]]:
        rows: list[tuple[str, float]] = self.client.zrangebyscore(
            self.key, "-inf", f"({seq}", 0, limit, withscores=True
        )  # type: ignore[assignment]
        return [(str(member), float(score)) for member, score in rows]

    def unacked_ids(self) -> set[str]:
        """Task ids of every message a worker holds unacked (all queues of the database)."""
        ids = set()
        for _, raw in self.client.hscan_iter(self.unacked_key, count=500):
            task_id = message_task_id(raw)
            if task_id is not None:
                ids.add(task_id)
        return ids


@dataclass
class SweepReport:
    checked: int = 0
    suspects: int = 0
    resent: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    skipped: str | None = None


Resend = Callable[[str, dict[str, Any]], None]
#: ``True`` a result is stored, ``False`` none is, ``None`` the store cannot tell now
HasResult = Callable[[str], bool | None]


class Sweeper:
    """Finds recorded requests the broker lost and re-sends them. Run ``sweep`` every
    ``interval_s``; one process sweeps at a time (a Redis lock held across sweeps, so the
    two-sweeps-in-a-row rule is judged by one process)."""

    def __init__(
        self,
        pending: PendingRequests,
        has_result: HasResult,
        resend: Resend,
        interval_s: float,
    ) -> None:
        self.pending = pending
        self.has_result = has_result
        self.resend = resend
        self.interval_s = interval_s
        # Made here, used by the sweeper thread: the token must not be thread-local.
        self._lock = pending.client.lock(
            pending.lock_key,
            timeout=max(3 * interval_s, 1.0),
            blocking=False,
            thread_local=False,
        )
        self._suspects: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> SweepReport:
        if not self._hold_lock():
            self._suspects.clear()
            return SweepReport(skipped="another worker sweeps")
        horizon = self.pending.horizon()
        if horizon is None:
            return SweepReport(skipped="the oldest queued messages are not recorded")
        candidates = self.pending.recorded_before(horizon)
        unacked = self.pending.unacked_ids() if candidates else set()
        report = SweepReport(checked=len(candidates))
        suspects: dict[str, float] = {}
        for request_id, seq in candidates:
            if request_id in unacked:
                continue
            stored = self.has_result(request_id)
            if stored is None:
                continue
            if stored:
                # Published, but its worker died before forgetting it.
                self.pending.forget(request_id)
                report.finished.append(request_id)
            elif self._suspects.get(request_id) == seq:
                self._resend(request_id)
                report.resent.append(request_id)
            else:
                suspects[request_id] = seq
        self._suspects = suspects
        report.suspects = len(suspects)
        return report

    def _hold_lock(self) -> bool:
        try:
            if self._lock.owned():
                self._lock.reacquire()
                return True
        except LockError:
            pass
        return bool(self._lock.acquire(blocking=False))

    def _resend(self, request_id: str) -> None:
        message = self.pending.message(request_id)
        if message is None:  # finished meanwhile
            return
        self.pending.renew(request_id)
        self.resend(request_id, message)
        metrics.PENDING_RESENT.inc()
        log.warning(
            "re-sent a request the broker lost", request_id=request_id, queue=self.pending.queue
        )

    # -- the background thread of a worker ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="modq-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._lock.owned():
                self._lock.release()
        except (LockError, redis.RedisError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                report = self.sweep()
            except Exception as exc:  # the thread must outlive a broker outage
                log.warning("pending sweep failed", error=str(exc))
                self._suspects.clear()
                continue
            if report.resent or report.finished:
                log.info(
                    "pending sweep",
                    checked=report.checked,
                    resent=len(report.resent),
                    finished=len(report.finished),
                )
