"""Every Prometheus metric modq exports, in one place."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

__all__ = [
    "BANK_MATCHES",
    "BATCH_SIZE",
    "BUILD_INFO",
    "CACHE_OUTCOMES",
    "DEAD_LETTERS",
    "EMBEDDINGS_DROPPED",
    "EMBEDDINGS_SUNK",
    "EMBEDDING_SINK_ERRORS",
    "ERRORS",
    "FORWARD_SECONDS",
    "HEATMAP_ERRORS",
    "IN_FLIGHT",
    "PENDING_RESENT",
    "PUBLISHED",
    "QUEUE_WAIT_SECONDS",
    "RETRIES",
    "VERDICTS",
]

BATCH_SIZE = Histogram(
    "modq_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
QUEUE_WAIT_SECONDS = Histogram(
    "modq_batch_queue_wait_seconds", "Time an image waited in the batcher before its forward pass"
)
FORWARD_SECONDS = Histogram("modq_forward_seconds", "Duration of one batched forward pass")
CACHE_OUTCOMES = Counter("modq_cache_total", "Verdict cache lookups by outcome", ["outcome"])
# Counted when a result was handed to its callback's broker, stream or endpoint: a result
# that could not be delivered (or had nowhere to go) counts in modq_dead_letters_total only.
VERDICTS = Counter("modq_verdicts_total", "Verdicts published", ["verdict"])
ERRORS = Counter("modq_errors_total", "Error results published, by stable code", ["code"])
IN_FLIGHT = Gauge("modq_in_flight", "Images being processed now")
RETRIES = Counter("modq_retries_total", "Task retries by the error that caused them", ["code"])
DEAD_LETTERS = Counter(
    "modq_dead_letters_total", "Requests sent to the dead-letter queue", ["reason"]
)
PUBLISHED = Counter(
    "modq_results_published_total", "Results published to callbacks", ["scheme", "status"]
)
PENDING_RESENT = Counter(
    "modq_pending_resent_total", "Requests the Redis transport lost, re-sent from their record"
)
EMBEDDINGS_SUNK = Counter("modq_embeddings_sunk_total", "Embeddings handed to the embedding sink")
EMBEDDING_SINK_ERRORS = Counter(
    "modq_embedding_sink_errors_total", "Embedding sink writes or shard flushes that failed"
)
EMBEDDINGS_DROPPED = Counter(
    "modq_embeddings_dropped_total", "Embeddings dropped because the sink's buffer was full"
)
BANK_MATCHES = Counter("modq_bank_matches_total", "Images blocked by a hash bank", ["bank"])
HEATMAP_ERRORS = Counter(
    "modq_heatmap_errors_total", "Review heatmaps that could not be made or written"
)
BUILD_INFO = Info("modq_build", "The modq version, model and Python of this worker")
