"""Redis-stream callbacks against a real redis-server that each test owns (and may kill)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from tests.support.redis_server import RedisServer
from worker.callbacks import RedisStreamPublisher, redis_stream_client
from worker.errors import CallbackFailed, InvalidCallback
from worker.messages import ModelInfo, ModerationResult, Status, Verdict

RESULT = ModerationResult(
    request_id="req-7",
    image="file:///srv/uploads/7.png",
    status=Status.OK,
    verdict=Verdict.REVIEW,
    nsfw_score=0.61,
    scores={"nsfw": 0.61, "sfw": 0.39},
    model=ModelInfo(id="opennsfw", revision="1", runtime="onnx", precision="fp32"),
    metadata={"album": "été"},
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own (one test kills it); without redis-server the test fails."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def reader(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url) as client:
        yield client


def test_xadd_round_trips_the_result(redis_server: RedisServer, reader: redis.Redis) -> None:
    publisher = RedisStreamPublisher(redis_stream_client(redis_server.url), maxlen=10)
    publisher.publish("redis-stream://moderation:results", RESULT)

    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], reader.xrange("moderation:results"))
    [(_, fields)] = entries
    assert fields[b"request_id"] == b"req-7"
    assert ModerationResult.model_validate_json(fields[b"result"]) == RESULT


def test_the_stream_is_capped(redis_server: RedisServer, reader: redis.Redis) -> None:
    publisher = RedisStreamPublisher(redis_stream_client(redis_server.url), maxlen=10)
    for _ in range(1_000):
        publisher.publish("redis-stream://capped", RESULT)
    # MAXLEN ~ trims whole internal nodes (100 entries by default): at least the cap remains.
    assert 10 <= reader.xlen("capped") <= 200


def test_a_key_of_another_type_is_a_permanent_refusal(
    redis_server: RedisServer, reader: redis.Redis
) -> None:
    reader.set("not-a-stream", "x")
    publisher = RedisStreamPublisher(redis_stream_client(redis_server.url))
    with pytest.raises(InvalidCallback, match="not a stream"):
        publisher.publish("redis-stream://not-a-stream", RESULT)


def test_redis_down_is_retryable(redis_server: RedisServer) -> None:
    publisher = RedisStreamPublisher(redis_stream_client(redis_server.url))
    publisher.publish("redis-stream://results", RESULT)
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(CallbackFailed, match="req-7") as caught:
        publisher.publish("redis-stream://results", RESULT)
    assert caught.value.retryable
    assert time.monotonic() - started < 10
