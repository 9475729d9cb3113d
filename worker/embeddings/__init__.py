"""Embeddings beyond the verdict: the record, the sinks the worker streams them to, and the
sources an index reads them back from."""

from worker.embeddings.record import EmbeddingRecord
from worker.embeddings.sink import EmbeddingSink, MemorySink, RedisStreamSink, ShardSink
from worker.embeddings.source import RecordSource, open_sink

__all__ = [
    "EmbeddingRecord",
    "EmbeddingSink",
    "MemorySink",
    "RecordSource",
    "RedisStreamSink",
    "ShardSink",
    "open_sink",
]
