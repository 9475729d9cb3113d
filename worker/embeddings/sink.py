"""Where the worker streams every embedding it computes: the ``EmbeddingSink`` seam.

    EmbeddingSink            write(record) · flush() · close()
    ├── MemorySink           keeps them in a list (tests, embedded use)
    ├── ShardSink            JSONL or Parquet shards in a folder or under an S3 prefix
    └── RedisStreamSink      one stream entry per embedding (XADD, MAXLEN ~)

Embeddings are derived data: a sink that cannot write never fails a moderation. Failures are
logged and counted (``modq_embedding_sink_errors_total``); a shard sink keeps unwritten
records and tries again at its next flush, up to a bound, past which the oldest are dropped
and counted. Records still buffered when a process is killed are lost; the next scan of the
same images computes them again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from worker import metrics
from worker.embeddings.record import EmbeddingRecord
from worker.embeddings.shards import FORMATS, encode_shard
from worker.errors import ConfigError, ModqError
from worker.log import get_logger
from worker.storage.folders import ObjectFolder

__all__ = ["EmbeddingSink", "MemorySink", "RedisStreamSink", "ShardSink", "stream_entry_to_dict"]

log = get_logger(__name__)


class EmbeddingSink(ABC):
    def write(self, record: EmbeddingRecord) -> None:
        """Hand one record to the sink; never raises."""
        try:
            self._write(record)
        except Exception as exc:  # embeddings must never fail the moderation they came from
            metrics.EMBEDDING_SINK_ERRORS.inc()
            log.warning("embedding sink failed", image=record.image, error=repr(exc))
        else:
            metrics.EMBEDDINGS_SUNK.inc()

    @abstractmethod
    def _write(self, record: EmbeddingRecord) -> None: ...

    def flush(self) -> None:  # noqa: B027 (unbuffered sinks have nothing to flush)
        """Write whatever is buffered."""

    def close(self) -> None:
        self.flush()


class MemorySink(EmbeddingSink):
    def __init__(self) -> None:
        self.records: list[EmbeddingRecord] = []
        self._lock = threading.Lock()

    def _write(self, record: EmbeddingRecord) -> None:
        with self._lock:
            self.records.append(record)


class ShardSink(EmbeddingSink):
    """Buffers records and writes a shard every ``shard_size`` records or ``flush_s`` seconds
    (a background thread flushes an idle buffer)."""

    def __init__(
        self,
        target: ObjectFolder,
        fmt: str = "jsonl",
        shard_size: int = 1000,
        flush_s: float = 60.0,
        max_buffered: int | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"embedding shard format {fmt!r}: use one of {', '.join(FORMATS)}")
        if shard_size < 1:
            raise ConfigError(f"embedding shard_size must be at least 1, got {shard_size}")
        self.target = target
        self.fmt = fmt
        self.shard_size = shard_size
        self.flush_s = flush_s
        self.max_buffered = max_buffered or 10 * shard_size
        self._buffer: list[EmbeddingRecord] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._sequence = 0
        self._prefix = f"embeddings-{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if flush_s > 0:
            self._flusher = threading.Thread(
                target=self._flush_periodically, name="modq-embedding-flush", daemon=True
            )
            self._flusher.start()

    def _write(self, record: EmbeddingRecord) -> None:
        with self._lock:
            self._buffer.append(record)
            full = len(self._buffer) >= self.shard_size
        if full:
            self.flush()

    def flush(self) -> None:
        with self._write_lock:  # one shard at a time, in order
            with self._lock:
                taken, self._buffer = self._buffer, []
            for start in range(0, len(taken), self.shard_size):
                chunk = taken[start : start + self.shard_size]
                try:
                    self._put(chunk)
                except (ModqError, OSError) as exc:
                    metrics.EMBEDDING_SINK_ERRORS.inc()
                    log.warning("embedding shard not written; kept", error=str(exc))
                    self._keep(taken[start:])
                    return

    def _put(self, chunk: list[EmbeddingRecord]) -> None:
        self._sequence += 1
        name = f"{self._prefix}-{self._sequence:06d}.{self.fmt}"
        self.target.put(name, encode_shard(chunk, self.fmt))

    def _keep(self, unwritten: list[EmbeddingRecord]) -> None:
        with self._lock:
            self._buffer = unwritten + self._buffer
            excess = len(self._buffer) - self.max_buffered
            if excess > 0:
                del self._buffer[:excess]
                metrics.EMBEDDINGS_DROPPED.inc(excess)
                log.error("embedding buffer full: oldest records dropped", dropped=excess)

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        self.flush()


class RedisStreamSink(EmbeddingSink):
    """``XADD <stream> MAXLEN ~ <maxlen>`` with the record's fields and the vector as
    little-endian float32 bytes (``embedding``), 4 bytes a dimension instead of ~20 as JSON."""

    def __init__(self, client: Any, stream: str, maxlen: int | None = 1_000_000) -> None:
        self.client = client
        self.stream = stream
        self.maxlen = maxlen

    def _write(self, record: EmbeddingRecord) -> None:
        fields = {k: ("" if v is None else v) for k, v in record.fields().items()}
        fields["embedding"] = record.vector.astype("<f4").tobytes()
        self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)


def stream_entry_to_dict(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A stream entry written by ``RedisStreamSink`` back into a record dict."""
    row: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items() if k != b"embedding"}
    row["embedding"] = np.frombuffer(fields[b"embedding"], dtype="<f4")
    row["location"] = row.get("location") or None
    return row
