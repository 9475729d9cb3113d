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
- one worker at a time sweeps (a Redis lock): a request recorded before every message near
  the head of the queue (the queue is first in, first out, so it has been popped) and not
  unacked, seen so in two sweeps in a row while the queue moved on (or is empty), is re-sent
  from its record. A revoked or expired request is forgotten: Celery acks it unrun.

A re-send is harmless: the first stored result wins and a re-delivery re-publishes it, so the
worst a wrong guess costs is a second identical result. Retries renew the sequence number
before they are published, so a retry waiting behind a backlog is not taken for lost;
messages put back in another order (a warm shutdown restores its prefetched ones newest
first) are covered by taking the lowest number among the next ``_WINDOW`` to be popped.

Redis keys (broker database): ``{prefix}:v1:pending:{queue}`` (sorted set, request id by
sequence), ``…:{queue}:messages`` (hash, request id to message JSON), ``…:{queue}:sweeper``
(the lock) and ``{prefix}:v1:pending:seq``. The set and hash empty as requests finish.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from redis.exceptions import LockError

from worker import metrics
from worker.config import ProducerSettings
from worker.log import get_logger
from worker.redisclient import redis_client

__all__ = [
    "PendingRequests",
    "Resend",
    "SweepReport",
    "Sweeper",
    "kept_options",
    "message_task_id",
    "resend_options",
]

log = get_logger(__name__)

#: kombu's Redis transport defaults: one list per priority step, named with this separator.
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEPARATOR = "\x06\x16"
#: how many of the next messages to be popped a sweep reads, per list
_WINDOW = 256
#: at most this many candidates are looked at, and re-sent, per sweep
_PER_SWEEP = 500

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


def kept_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The send options a re-send keeps, as JSON: ``priority``, and ``expires`` made an
    absolute ISO time (Celery takes seconds from now or a datetime)."""
    kept: dict[str, Any] = {}
    if isinstance(options.get("priority"), int):
        kept["priority"] = options["priority"]
    expires = options.get("expires")
    if isinstance(expires, int | float):
        expires = datetime.now(UTC) + timedelta(seconds=expires)
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            expires = expires.astimezone()
        kept["expires"] = expires.isoformat()
    return kept


def resend_options(kept: Mapping[str, Any]) -> dict[str, Any]:
    """``kept_options`` back into ``send_task`` keywords."""
    options = dict(kept)
    if "expires" in options:
        options["expires"] = datetime.fromisoformat(options["expires"])
    return options


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
        separator = str(options.get("sep", _PRIORITY_SEPARATOR))
        steps = options.get("priority_steps", _PRIORITY_STEPS)
        self.queue_keys = [
            kombu_prefix + (f"{queue}{separator}{step}" if step else queue) for step in steps
        ]
        self.unacked_key = kombu_prefix + str(options.get("unacked_key", "unacked"))
        self._record = client.register_script(_RECORD)
        self._renew = client.register_script(_RENEW)

    @classmethod
    def from_settings(cls, settings: ProducerSettings) -> PendingRequests | None:
        """The record on the broker Redis; ``None`` for another broker (AMQP acknowledges a
        message only once it was delivered, so it has no such gap) or with the sweep off."""
        if settings.pending_sweep_s <= 0 or not settings.broker_url.startswith(
            ("redis://", "rediss://")
        ):
            return None
        client = redis_client(settings.broker_url, timeout_s=10)
        return cls(client, settings.cache_prefix, settings.queue, settings.broker_transport_options)

    def close(self) -> None:
        self.client.close()

    def record(
        self, request_id: str, message: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> int:
        """Note a request about to be enqueued, with the send options a re-send must keep
        (JSON: ``priority``, ``expires`` as an ISO time); returns its sequence number."""
        entry = {"message": message, "options": dict(options or {})}
        seq = self._record(
            keys=[self.key, self.messages_key, self.seq_key],
            args=[request_id, json.dumps(entry, separators=(",", ":"))],
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

    def entry(self, request_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The recorded message and send options, if the request is still recorded."""
        text = self.client.hget(self.messages_key, request_id)
        if text is None:
            return None
        entry = json.loads(text)
        return dict(entry["message"]), dict(entry.get("options") or {})

    def count(self) -> int:
        return int(self.client.zcard(self.key))

    def horizon(self) -> tuple[float, bool] | None:
        """The sequence number below which every recorded request has left the queue (the
        lowest among the next messages to be popped, or the next number when the queue is
        empty), and whether the queue is empty. ``None`` when a list's next messages are
        none of them recorded (sent by another producer), so nothing can be told now."""
        next_seq = int(self.client.get(self.seq_key) or 0) + 1
        with self.client.pipeline(transaction=False) as pipe:
            for key in self.queue_keys:
                pipe.lrange(key, -_WINDOW, -1)  # the list's tail is popped first
            windows: list[list[str]] = pipe.execute()
        lowest: float | None = None
        for window in windows:
            if not window:
                continue
            seqs = self._recorded_seqs(window)
            if not seqs:
                return None
            lowest = min(seqs) if lowest is None else min(lowest, *seqs)
        return (float(next_seq), True) if lowest is None else (lowest, False)

    def _recorded_seqs(self, raws: list[str]) -> list[float]:
        ids = [task_id for task_id in map(message_task_id, raws) if task_id is not None]
        if not ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.zscore(self.key, task_id)
            scores: list[float | None] = pipe.execute()
        return [float(score) for score in scores if score is not None]

    def recorded_before(self, seq: float, limit: int = _PER_SWEEP) -> list[tuple[str, float]]:
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
    skipped: str | None = None


#: re-sends a request: its id, recorded message and send options
Resend = Callable[[str, dict[str, Any], dict[str, Any]], None]


class Sweeper:
    """Finds recorded requests the broker lost and re-sends them. Run ``sweep`` every
    ``interval_s``; one process sweeps at a time (a Redis lock held across sweeps, so the
    two-sweeps-in-a-row rule is judged by one process). While the queue does not move (every
    worker busy) nothing is re-sent: what looks lost then may only wait behind the window."""

    def __init__(self, pending: PendingRequests, resend: Resend, interval_s: float) -> None:
        self.pending = pending
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
        self._last_horizon: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._skipped: str | None = None

    def sweep(self) -> SweepReport:
        if not self._hold_lock():
            self._forget_suspects()
            return SweepReport(skipped="another worker sweeps")
        horizon = self.pending.horizon()
        if horizon is None:
            self._forget_suspects()
            return SweepReport(skipped="the next queued messages are not recorded")
        seq_below, empty = horizon
        # The queue moved on since the last sweep (or holds nothing): a suspect is not just
        # waiting behind the window of a queue no worker takes from.
        progressing = empty or (self._last_horizon is not None and seq_below != self._last_horizon)
        self._last_horizon = seq_below
        candidates = self.pending.recorded_before(seq_below)
        unacked = self.pending.unacked_ids() if candidates else set()
        report = SweepReport(checked=len(candidates))
        suspects: dict[str, float] = {}
        for request_id, seq in candidates:
            if request_id in unacked:
                continue
            if self._suspects.get(request_id) == seq and progressing:
                self._lock.reacquire()
                self._resend(request_id)
                report.resent.append(request_id)
            else:
                suspects[request_id] = seq
        self._suspects = suspects
        report.suspects = len(suspects)
        return report

    def _forget_suspects(self) -> None:
        self._suspects.clear()
        self._last_horizon = None

    def _hold_lock(self) -> bool:
        try:
            if self._lock.owned():
                self._lock.reacquire()
                return True
        except LockError:
            pass
        return bool(self._lock.acquire(blocking=False))

    def _resend(self, request_id: str) -> None:
        entry = self.pending.entry(request_id)
        if entry is None:  # finished meanwhile
            return
        self.pending.renew(request_id)
        self.resend(request_id, *entry)
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
            self._thread.join(timeout=self.interval_s + 10)
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
            if report.skipped != self._skipped:
                self._skipped = report.skipped
                if report.skipped:
                    log.info("pending sweep paused", reason=report.skipped)
