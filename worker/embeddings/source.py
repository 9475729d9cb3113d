"""Sinks and sources by URI: where embeddings go, and where an index reads them back.

    file:///srv/embeddings?format=parquet   shards in a folder (a bare path works too)
    s3://bucket/embeddings/?format=jsonl    shards under an S3 prefix
    redis-stream://modq:embeddings          a Redis stream (on MODQ_CALLBACK_REDIS_URL,
                                            else the broker)

Query options of a sink: ``format`` (jsonl, parquet), ``shard_size``, ``flush_s`` for shards;
``maxlen`` for a stream. A source may also be a ``modq scan --embed`` report or a folder of
them: every ``.jsonl`` and ``.parquet`` file under it is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from worker.config import EndpointSettings
from worker.embeddings.record import EmbeddingRecord
from worker.embeddings.shards import decode_shard, shard_format
from worker.embeddings.sink import (
    EmbeddingSink,
    RedisStreamSink,
    ShardSink,
    stream_entry_to_dict,
)
from worker.errors import ConfigError, InvalidDataset
from worker.storage.folders import LocalFolder, open_folder

__all__ = ["RecordSource", "open_sink"]

_STREAM_PAGE = 1000


def _options(query: str, allowed: set[str], uri: str) -> dict[str, str]:
    options = dict(parse_qsl(query))
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(f"{uri}: unknown option(s) {', '.join(sorted(unknown))}")
    return options


def _redis(endpoints: EndpointSettings) -> Any:
    from worker.redisclient import redis_client

    # Records are read and written as bytes (the vector is packed), in large pipelines.
    return redis_client(endpoints.redis_url, 10.0, decode_responses=False)


_LOCAL = EndpointSettings()  # no S3 endpoint of its own; Redis on this machine


def open_sink(uri: str, endpoints: EndpointSettings = _LOCAL) -> EmbeddingSink:
    """The sink ``MODQ_EMBEDDING_SINK`` (or ``--embedding-sink``) names."""
    parts = urlsplit(uri)
    try:
        if parts.scheme == "redis-stream":
            options = _options(parts.query, {"maxlen"}, uri)
            maxlen = int(options.get("maxlen", 1_000_000))
            return RedisStreamSink(_redis(endpoints), _stream_name(uri), maxlen)
        options = _options(parts.query, {"format", "shard_size", "flush_s"}, uri)
        return ShardSink(
            open_folder(uri, endpoints.s3_endpoint_url),
            options.get("format", "jsonl"),
            int(options.get("shard_size", 1000)),
            float(options.get("flush_s", 60.0)),
        )
    except ValueError as exc:
        raise ConfigError(f"embedding sink {uri}: {exc}") from exc


def _stream_name(uri: str) -> str:
    parts = urlsplit(uri)
    name = unquote(parts.netloc + parts.path)
    if not name:
        raise ConfigError(f"{uri}: name the stream, e.g. redis-stream://modq:embeddings")
    return name


@dataclass
class RecordSource:
    """Every embedding record behind ``uri``; rows without an embedding (error results,
    scans run without ``--embed``) are counted in ``skipped``, malformed rows raise."""

    uri: str
    endpoints: EndpointSettings = _LOCAL
    skipped: int = 0

    def __iter__(self) -> Iterator[EmbeddingRecord]:
        if urlsplit(self.uri).scheme == "redis-stream":
            yield from self._stream()
            return
        target = open_folder(self.uri, self.endpoints.s3_endpoint_url)
        if isinstance(target, LocalFolder) and not target.folder.exists():
            raise InvalidDataset(f"{self.uri}: no such file or folder")
        for name in target.names():
            fmt = shard_format(name)
            if fmt is None:
                continue
            for row in decode_shard(target.get(name), fmt, name):
                if row.get("embedding") is None:
                    self.skipped += 1
                    continue
                yield EmbeddingRecord.from_dict(row)

    def _stream(self) -> Iterator[EmbeddingRecord]:
        client = _redis(self.endpoints)
        stream = _stream_name(self.uri)
        start = "-"
        while True:
            entries = client.xrange(stream, min=start, count=_STREAM_PAGE)
            for entry_id, fields in entries:
                yield EmbeddingRecord.from_dict(stream_entry_to_dict(fields))
                start = "(" + entry_id.decode()
            if len(entries) < _STREAM_PAGE:
                return
