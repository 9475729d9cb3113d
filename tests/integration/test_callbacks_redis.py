"""Redis-stream callbacks against a real redis-server that each test owns (and may kill)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(tmp_path)]
    server = RedisServer(subprocess.Popen(command, stdout=subprocess.DEVNULL), port)
    try:
        _wait_for_ping(server)
        yield server
    finally:
        server.stop()


def _wait_for_ping(server: RedisServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(server.url, socket_connect_timeout=0.5) as client:
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {server.port} did not start")
            time.sleep(0.05)


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
