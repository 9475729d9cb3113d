"""Embedding sinks against real servers: shards over HTTP to the S3-compatible server, a Redis
stream on a real redis-server, and a real `modq worker` streaming every embedding it computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.integration.conftest import WorkerFactory
from tests.support.images import distinct_images
from tests.support.receivers import STREAM, Collector
from tests.support.redis_server import RedisServer
from tests.support.s3_server import CREDENTIALS, S3Server
from worker.config import Settings
from worker.embeddings import EmbeddingRecord, RecordSource, open_sink
from worker.messages import Status, Verdict
from worker.queue.client import Client


def _records(count: int) -> list[EmbeddingRecord]:
    rng = np.random.default_rng(7)
    return [
        EmbeddingRecord(
            f"r{i}",
            f"s3://up/{i}.jpg",
            f"{i:064x}",
            "m",
            "1",
            "review",
            0.6,
            rng.normal(size=16).astype(np.float32),
            location=None if i % 2 else f"s3://q/{i}",
        )
        for i in range(count)
    ]


def _s3_settings(s3: S3Server) -> Settings:
    return Settings(s3_endpoint_url=s3.endpoint_url)


def test_parquet_shards_in_a_bucket_read_back_whole(
    s3_moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in (
        ("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"]),
        ("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"]),
        ("AWS_DEFAULT_REGION", CREDENTIALS["region_name"]),
    ):
        monkeypatch.setenv(key, value)
    s3_moto.client().create_bucket(Bucket="emb-parquet")
    settings = _s3_settings(s3_moto)
    sink = open_sink(
        "s3://emb-parquet/shards/?format=parquet&shard_size=4&flush_s=0", settings.endpoints
    )
    written = _records(10)
    for record in written:
        sink.write(record)
    sink.close()
    keys = [o["Key"] for o in s3_moto.client().list_objects_v2(Bucket="emb-parquet")["Contents"]]
    assert len(keys) == 3 and all(k.startswith("shards/") and k.endswith(".parquet") for k in keys)
    read = list(RecordSource("s3://emb-parquet/shards/", settings.endpoints))
    assert [r.to_dict() for r in read] == [r.to_dict() for r in written]


def test_a_redis_stream_sink_reads_back_page_by_page(
    redis_server: RedisServer, db_pair: int
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/{db_pair}"
    settings = Settings(broker_url=url)
    sink = open_sink("redis-stream://modq:test-embeddings", settings.endpoints)
    written = _records(2500)  # more than one XRANGE page
    for record in written:
        sink.write(record)
    client = redis.Redis.from_url(url)
    assert client.xlen("modq:test-embeddings") == 2500
    entry = client.xrange("modq:test-embeddings", count=1)[0][1]
    assert len(entry[b"embedding"]) == 16 * 4  # float32 bytes, not JSON
    read = list(RecordSource("redis-stream://modq:test-embeddings", settings.endpoints))
    assert [r.to_dict() for r in read] == [r.to_dict() for r in written]
    client.delete("modq:test-embeddings")


def test_the_worker_streams_every_embedding_with_where_the_image_went(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    paths = []
    for i, data in enumerate(distinct_images(6, seed=11)):
        paths.append(uploads / f"{i}.jpg")
        paths[-1].write_bytes(data)
    policy = tmp_path / "policy.json"
    # everything blocked: every image moves, and its record must say where to
    policy.write_text(json.dumps({"name": "half", "review_at": 0.0, "block_at": 0.0}))
    shards = tmp_path / "shards"
    worker = start_worker(
        {
            "MODQ_ALLOWED_ROOTS": str(uploads),
            "MODQ_QUARANTINE_URI": f"file://{tmp_path / 'quarantine'}",
            "MODQ_POLICY": str(policy),
            "MODQ_EMBEDDING_SINK": f"file://{shards}?format=jsonl&flush_s=0.5",
        }
    )
    collector = Collector(start_worker.broker_url)
    callback = f"redis-stream://{STREAM}"
    with Client(Settings(broker_url=start_worker.broker_url)) as client:
        for i, path in enumerate(paths):
            client.submit(f"file://{path}", request_id=f"emb-{i}", callback=callback)
    collector.wait_for(len(paths), timeout=120)
    worker.stop()
    results = {rid: got[0] for rid, got in collector.results.items()}
    assert all(r.status is Status.OK and r.verdict is Verdict.BLOCK for r in results.values())
    records = {r.request_id: r for r in RecordSource(str(shards))}
    assert set(records) == set(results)
    for request_id, record in records.items():
        result = results[request_id]
        assert result.embedding is None  # streamed; the request did not ask for it
        assert result.action is not None and record.location == result.action.location
        assert Path(record.location.removeprefix("file://")).exists()
        assert record.sha256 == result.hashes.sha256 and record.vector.size == 1024
    collector.close()
