"""What sits on the caller's side of queue mode in the integration tests: an HTTPS server
(webhook receiver and image host) and a collector that reads every callback kind."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
import standardwebhooks
from kombu import Connection

from tests.support.tls import make_tls
from worker.callbacks import verify_signature
from worker.messages import ModerationResult

__all__ = [
    "RESULT_QUEUE",
    "SECRET",
    "STREAM",
    "Collector",
    "HttpSide",
    "drain",
    "drain_with_headers",
    "https_side",
]

SECRET = "integration-webhook-secret"
RESULT_QUEUE = "test-results"
STREAM = "test-stream"


@dataclass
class HttpSide:
    url: str
    ca: Path
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    #: per path: how many more GETs answer 503 before the image is served
    failures: dict[str, int] = field(default_factory=dict)
    gets: list[str] = field(default_factory=list)
    #: how many more webhook POSTs answer 503 (the endpoint is down) before one is taken
    post_failures: int = 0
    #: monotonic time of every POST, taken or refused
    post_times: list[float] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    side: HttpSide

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.side.post_times.append(time.monotonic())
        if self.side.post_failures > 0:
            self.side.post_failures -= 1
            self._answer(503, b"")
            return
        self.side.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.side.gets.append(self.path)
        if self.side.failures.get(self.path, 0) > 0:
            self.side.failures[self.path] -= 1
            self._answer(503, b"")
            return
        data = self.side.images.get(self.path)
        self._answer(200 if data is not None else 404, data or b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def https_side(folder: Path) -> Iterator[HttpSide]:
    """An HTTPS server on 127.0.0.1 with a certificate from a test CA (``side.ca``)."""
    tls = make_tls(folder, ips=("127.0.0.1",))
    side = HttpSide("", tls.ca)
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"side": side}))
    server.socket = tls.server_context().wrap_socket(server.socket, server_side=True)
    side.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield side
    finally:
        server.shutdown()
        server.server_close()


def drain(broker_url: str, queue: str) -> list[Any]:
    """Every message now on ``queue``, decoded (Celery messages: ``[args, kwargs, embed]``)."""
    return [body for _, body in drain_with_headers(broker_url, queue)]


def drain_with_headers(broker_url: str, queue: str) -> list[tuple[dict[str, Any], Any]]:
    """(headers, decoded body) of every message now on ``queue``: what a Celery consumer
    reads."""
    messages = []
    with Connection(broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(timeout=0.2)
            except simple.Empty:
                break
            body = message.body
            decoded = json.loads(body) if isinstance(body, str | bytes) else body
            messages.append((dict(message.headers or {}), decoded))
            message.ack()
        simple.close()
    return messages


class Collector:
    """Reads every callback kind: the Celery queue, the Redis stream and the webhook."""

    def __init__(self, broker_url: str, http: HttpSide | None = None) -> None:
        self.broker_url = broker_url
        self.http = http
        self.redis = redis.Redis.from_url(broker_url)
        self.stream_seen = "0-0"
        self.hooks_seen = 0
        self.results: dict[str, list[ModerationResult]] = {}

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.results.values())

    def wait_for(self, want: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count < want and time.monotonic() < deadline:
            self.poll()
        assert self.count >= want, f"only {self.count} of {want} results arrived"

    def poll(self) -> None:
        for body in drain(self.broker_url, RESULT_QUEUE):
            self._add(ModerationResult.model_validate(body[0][0]))
        for _, entries in self.redis.xread({STREAM: self.stream_seen}, block=200) or []:
            for entry_id, fields in entries:
                self.stream_seen = entry_id
                self._add(ModerationResult.model_validate_json(fields[b"result"]))
        received = self.http.received if self.http is not None else []
        while self.hooks_seen < len(received):
            headers, body = received[self.hooks_seen]
            self.hooks_seen += 1
            assert verify_signature(
                SECRET.encode(), body, headers["x-modq-timestamp"], headers["x-modq-signature"]
            ), "webhook signature does not verify"
            # The Standard Webhooks headers, checked by that project's own verifier.
            standardwebhooks.Webhook(SECRET.encode()).verify(body, headers)
            self._add(ModerationResult.model_validate_json(body))

    def _add(self, result: ModerationResult) -> None:
        self.results.setdefault(result.request_id, []).append(result)

    def close(self) -> None:
        self.redis.close()
