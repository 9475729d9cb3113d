"""Publishers deliver each result where its request asked, and refuse what they must.

Webhooks go to a real HTTPS server on 127.0.0.1 whose certificate names ``hooks.test`` only,
so the tests also show that the connection to the checked address still verifies the
certificate against the hostname.
"""

from __future__ import annotations

import base64
import http.server
import inspect
import ipaddress
import json
import ssl
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import standardwebhooks
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.support.tls import make_tls
from worker.callbacks import (
    CallbackRouter,
    CeleryPublisher,
    MemoryPublisher,
    RedisStreamPublisher,
    WebhookPublisher,
    build_publisher,
    signing_key,
    verify_signature,
)
from worker.callbacks import webhook as webhook_module
from worker.config import Settings
from worker.errors import CallbackFailed, InvalidCallback, StorageUnavailable
from worker.messages import (
    CacheInfo,
    CacheOutcome,
    HashInfo,
    ModelInfo,
    ModerationResult,
    Status,
    Verdict,
)
from worker.storage.netguard import NetworkGuard

SECRET = "s3cret-for-tests"
HOST = "hooks.test"

RESULT = ModerationResult(
    request_id="req-42",
    image="s3://uploads/a.jpg",
    status=Status.OK,
    verdict=Verdict.BLOCK,
    nsfw_score=0.97,
    scores={"nsfw": 0.97, "sfw": 0.03},
    model=ModelInfo(id="opennsfw", revision="1", runtime="onnx", precision="fp32"),
    cache=CacheInfo(outcome=CacheOutcome.MISS),
    hashes=HashInfo(sha256="ab" * 32, phash="0f" * 8),
    metadata={"tenant": "t1", "note": "ünïcode"},
)


# -- a TLS receiver ------------------------------------------------------------------------


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    files = make_tls(tmp_path_factory.mktemp("tls"), dns_names=(HOST,))
    return Tls(files.server_context(), files.client_context())


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers with ``statuses`` in turn (the last one repeats) and records every request."""

    port: int
    statuses: list[int] = field(default_factory=lambda: [200])
    extra_headers: dict[str, str] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)

    def url(self, host: str = HOST, path: str = "/hook?tenant=t1") -> str:
        return f"https://{host}:{self.port}{path}"

    def answer(self, received: Received) -> int:
        self.requests.append(received)
        return self.statuses[min(len(self.requests), len(self.statuses)) - 1]


@pytest.fixture
def receiver(tls: Tls) -> Iterator[Receiver]:
    state: list[Receiver] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = state[0].answer(Received(self.path, dict(self.headers.items()), body))
            self.send_response(status)
            for name, value in state[0].extra_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = tls.server.wrap_socket(server.socket, server_side=True)
    state.append(Receiver(server.server_address[1]))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield state[0]
    server.shutdown()
    server.server_close()
    thread.join()


@dataclass
class Resolver:
    answer: list[str]
    calls: list[str] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answer


@pytest.fixture
def make_webhook(tls: Tls) -> Iterator[Callable[..., WebhookPublisher]]:
    made: list[WebhookPublisher] = []

    def make(
        *,
        resolver: Callable[[str, int], list[str]] | None = None,
        allowed: tuple[str, ...] = ("127.0.0.1/32",),
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> WebhookPublisher:
        guard = NetworkGuard(allowed, resolver=resolver or Resolver(["127.0.0.1"]))
        options.setdefault("secret", SECRET)
        options.setdefault("backoff_s", 0.001)
        options.setdefault("retries", 2)
        transport = transport or httpx.HTTPTransport(
            verify=tls.client, limits=httpx.Limits(max_keepalive_connections=0)
        )
        publisher = WebhookPublisher(guard, options.pop("secret"), transport=transport, **options)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.close()


def _documented_verify() -> Callable[[bytes, bytes, str, str], bool]:
    """The verification snippet of the webhook module's docstring, run as a receiver would."""
    doc = inspect.getdoc(webhook_module) or ""
    after = doc.split("Verify against the raw body, before parsing it::\n", 1)[1]
    lines: list[str] = []
    for line in after.splitlines():
        if line and not line.startswith(" "):
            break  # the literal block ends at the first unindented line
        lines.append(line)
    code = textwrap.dedent("\n".join(lines))
    assert "def verify" in code
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    verify: Callable[[bytes, bytes, str, str], bool] = namespace["verify"]
    return verify


# -- webhooks ------------------------------------------------------------------------------


def test_webhook_delivers_signed_body_that_the_documented_snippet_verifies(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    make_webhook().publish(receiver.url(), RESULT)

    [got] = receiver.requests
    assert got.path == "/hook?tenant=t1"
    assert got.body == RESULT.model_dump_json().encode()
    assert ModerationResult.model_validate_json(got.body) == RESULT
    assert got.headers["Host"] == f"{HOST}:{receiver.port}"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Modq-Request-Id"] == got.headers["Idempotency-Key"] == "req-42"
    timestamp, signature = got.headers["X-Modq-Timestamp"], got.headers["X-Modq-Signature"]
    verify = _documented_verify()
    assert verify(SECRET.encode(), got.body, timestamp, signature)
    assert verify_signature(SECRET.encode(), got.body, timestamp, signature)
    assert not verify(SECRET.encode(), got.body + b" ", timestamp, signature)
    assert not verify(b"another secret", got.body, timestamp, signature)
    assert not verify(SECRET.encode(), got.body, str(int(timestamp) - 3600), signature)


@pytest.mark.parametrize(
    ("secret", "key"),
    [(SECRET, SECRET.encode()), ("whsec_" + base64.b64encode(b"\x00k3y\xff").decode(), None)],
)
def test_webhook_deliveries_verify_with_the_standard_webhooks_library(
    receiver: Receiver,
    make_webhook: Callable[..., WebhookPublisher],
    secret: str,
    key: bytes | None,
) -> None:
    """A ``whsec_`` secret is what off-the-shelf verifiers take as is; any other secret is
    handed to them as its bytes."""
    publisher = make_webhook(secret=secret, retries=3)
    receiver.statuses = [503, 200]
    publisher.publish(receiver.url(), RESULT)
    first, second = receiver.requests
    verifier = standardwebhooks.Webhook(secret if key is None else key)
    for got in (first, second):
        assert verifier.verify(got.body, got.headers) == json.loads(RESULT.model_dump_json())
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "req-42"
    forged = {**second.headers, "webhook-id": "req-43"}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(second.body, forged)
    stale = str(int(second.headers["webhook-timestamp"]) - 3600)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(second.body, {**second.headers, "webhook-timestamp": stale})
    # The modq header is signed with the same key.
    used = signing_key(secret)
    headers = second.headers
    assert verify_signature(
        used, second.body, headers["X-Modq-Timestamp"], headers["X-Modq-Signature"]
    )


def test_a_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(InvalidCallback, match="not base64"):
        signing_key("whsec_not*base64")


def test_webhook_retries_503_then_delivers(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    receiver.statuses = [503, 503, 200]
    make_webhook(retries=3).publish(receiver.url(), RESULT)
    assert len(receiver.requests) == 3
    bodies = {r.body for r in receiver.requests}
    assert bodies == {RESULT.model_dump_json().encode()}


def test_webhook_4xx_is_permanent_after_one_request(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    receiver.statuses = [400]
    with pytest.raises(InvalidCallback, match="HTTP 400"):
        make_webhook(retries=3).publish(receiver.url(), RESULT)
    assert len(receiver.requests) == 1


def test_webhook_redirects_are_not_followed(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    receiver.statuses = [302]
    receiver.extra_headers = {"Location": "https://169.254.169.254/latest/meta-data/"}
    with pytest.raises(InvalidCallback, match="redirects are not followed"):
        make_webhook().publish(receiver.url(), RESULT)
    assert len(receiver.requests) == 1


def test_webhook_always_500_fails_retryably_after_all_attempts(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    receiver.statuses = [500]
    with pytest.raises(CallbackFailed, match="after 4 attempts: HTTP 500") as caught:
        make_webhook(retries=3).publish(receiver.url(), RESULT)
    assert caught.value.retryable
    assert len(receiver.requests) == 4


def test_webhook_honours_retry_after(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    receiver.statuses = [429, 200]
    receiver.extra_headers = {"Retry-After": "2"}
    sleeps: list[float] = []
    make_webhook(sleep=sleeps.append).publish(receiver.url(), RESULT)
    assert len(receiver.requests) == 2
    assert sleeps and sleeps[0] >= 2


def test_webhook_gives_up_when_retry_after_exceeds_the_budget(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    receiver.statuses = [503]
    receiver.extra_headers = {"Retry-After": "120"}
    sleeps: list[float] = []
    with pytest.raises(CallbackFailed, match="after 1 attempts"):
        make_webhook(sleep=sleeps.append, max_total_s=5).publish(receiver.url(), RESULT)
    assert len(receiver.requests) == 1
    assert sleeps == []


def test_webhook_certificate_must_name_the_url_host(
    receiver: Receiver, make_webhook: Callable[..., WebhookPublisher]
) -> None:
    # other.test resolves to the same checked address, but the certificate names hooks.test.
    with pytest.raises(CallbackFailed, match=r"ConnectError.*Hostname mismatch"):
        make_webhook(retries=0).publish(receiver.url(host="other.test"), RESULT)
    assert receiver.requests == []


class CountingTransport(httpx.BaseTransport):
    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return httpx.Response(200)


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "127.0.0.1", "::1"])
def test_webhook_to_non_public_address_is_refused_without_connecting(
    make_webhook: Callable[..., WebhookPublisher], address: str
) -> None:
    transport = CountingTransport()
    publisher = make_webhook(resolver=Resolver([address]), allowed=(), transport=transport)
    with pytest.raises(InvalidCallback, match="not public"):
        publisher.publish(f"https://{HOST}/hook", RESULT)
    assert transport.calls == 0


def test_webhook_connects_to_the_checked_address(
    make_webhook: Callable[..., WebhookPublisher],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    public = "93.184.215.14"
    assert ipaddress.ip_address(public).is_global
    transport = httpx.MockTransport(handler)
    publisher = make_webhook(resolver=Resolver([public]), allowed=(), transport=transport)
    publisher.publish(f"https://{HOST}/hook?x=1#frag", RESULT)
    [request] = seen
    assert str(request.url) == f"https://{public}/hook?x=1"
    assert request.headers["Host"] == HOST
    assert request.extensions["sni_hostname"] == HOST


@pytest.mark.parametrize("secret", [None, ""])
def test_webhook_without_a_secret_is_refused(
    make_webhook: Callable[..., WebhookPublisher], secret: str | None
) -> None:
    transport = CountingTransport()
    with pytest.raises(InvalidCallback, match="MODQ_WEBHOOK_SECRET"):
        make_webhook(secret=secret, transport=transport).publish(f"https://{HOST}/h", RESULT)
    assert transport.calls == 0


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"http://{HOST}/hook", "https:// only"),
        (f"https://user:pw@{HOST}/hook", "credentials"),
    ],
)
def test_webhook_url_refusals(
    make_webhook: Callable[..., WebhookPublisher], uri: str, message: str
) -> None:
    transport = CountingTransport()
    with pytest.raises(InvalidCallback, match=message):
        make_webhook(transport=transport).publish(uri, RESULT)
    assert transport.calls == 0


def test_webhook_dns_failures_and_timeouts_are_retried(
    make_webhook: Callable[..., WebhookPublisher],
) -> None:
    def unresolvable(host: str, port: int) -> list[str]:
        raise StorageUnavailable(f"cannot resolve {host!r}")

    resolver_calls: list[str] = []

    def counting(host: str, port: int) -> list[str]:
        resolver_calls.append(host)
        return unresolvable(host, port)

    with pytest.raises(CallbackFailed, match="cannot resolve"):
        make_webhook(resolver=counting, retries=2).publish(f"https://{HOST}/h", RESULT)
    assert len(resolver_calls) == 3

    transport = CountingTransport(httpx.ReadTimeout("slow receiver"))
    with pytest.raises(CallbackFailed, match="ReadTimeout"):
        make_webhook(transport=transport, retries=1).publish(f"https://{HOST}/h", RESULT)
    assert transport.calls == 2


# -- celery --------------------------------------------------------------------------------


@dataclass
class SendTask:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    error: Exception | None = None

    def __call__(self, name: str, **options: Any) -> object:
        if self.error is not None:
            raise self.error
        self.calls.append((name, options))
        return object()


@pytest.mark.parametrize(
    ("uri", "name", "queue"),
    [
        ("celery://proj.tasks.on_result?queue=results", "proj.tasks.on_result", "results"),
        ("celery://proj.tasks.on_result", "proj.tasks.on_result", "celery"),
        ("celery://proj.tasks.on_result/?queue=a.b", "proj.tasks.on_result", "a.b"),
        ("celery://app:on-result", "app:on-result", "celery"),
        ("celery://proj/tasks.on_result", "proj/tasks.on_result", "celery"),
    ],
)
def test_celery_publisher_sends_the_named_task(uri: str, name: str, queue: str) -> None:
    send_task = SendTask()
    CeleryPublisher(send_task).publish(uri, RESULT)
    [(sent_name, options)] = send_task.calls
    assert sent_name == name
    assert options.pop("queue") == queue
    assert options == {"args": [json.loads(RESULT.model_dump_json())], "serializer": "json"}
    assert ModerationResult.model_validate(options["args"][0]) == RESULT


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("celery://proj.tasks.x?quene=results", "does not take"),
        ("celery://proj.tasks.x?queue=a&queue=b", "once"),
        ("celery://proj.tasks.x?queue=", "cannot target"),
        ("celery://proj.tasks.x?queue=modq", "cannot target"),
        ("celery://proj%20tasks", "needs a name"),
        ("celery://proj.tasks.x#f", "fragment"),
        ("redis-stream://proj.tasks.x", "expected a celery://"),
    ],
)
def test_celery_publisher_refuses_bad_uris(uri: str, message: str) -> None:
    send_task = SendTask()
    with pytest.raises(InvalidCallback, match=message):
        CeleryPublisher(send_task, reserved_queues=["modq"]).publish(uri, RESULT)
    assert send_task.calls == []


def test_celery_callback_without_a_queue_cannot_be_routed_to_modqs_own() -> None:
    """A worker whose own queue is Celery's default has nowhere to send ``celery://t``."""
    send_task = SendTask()
    publisher = CeleryPublisher(send_task, reserved_queues=["celery", "modq.dead"])
    with pytest.raises(InvalidCallback, match=r"'celery' \(the default without \?queue=\)"):
        publisher.publish("celery://proj.tasks.x", RESULT)
    publisher.publish("celery://proj.tasks.x?queue=results", RESULT)
    assert [options["queue"] for _, options in send_task.calls] == ["results"]


@pytest.mark.parametrize(
    "error", [OperationalError("broker down"), ConnectionRefusedError(111, "refused")]
)
def test_celery_broker_errors_are_retryable(error: Exception) -> None:
    with pytest.raises(CallbackFailed, match="req-42"):
        CeleryPublisher(SendTask(error=error)).publish("celery://proj.tasks.x", RESULT)


def test_celery_bugs_are_not_disguised_as_broker_errors() -> None:
    with pytest.raises(TypeError):
        CeleryPublisher(SendTask(error=TypeError("bug"))).publish("celery://proj.tasks.x", RESULT)


# -- redis streams (the real server is in tests/integration) --------------------------------


@dataclass
class FakeStreams:
    entries: list[tuple[str, dict[Any, Any], int | None, bool]] = field(default_factory=list)
    error: Exception | None = None

    def xadd(
        self, name: str, fields: dict[Any, Any], *, maxlen: int | None, approximate: bool
    ) -> object:
        if self.error is not None:
            raise self.error
        self.entries.append((name, fields, maxlen, approximate))
        return "1-0"


def test_stream_publisher_adds_one_capped_entry() -> None:
    client = FakeStreams()
    RedisStreamPublisher(client, maxlen=1000).publish("redis-stream://moderation:results", RESULT)
    [(name, fields, maxlen, approximate)] = client.entries
    assert (name, maxlen, approximate) == ("moderation:results", 1000, True)
    assert fields["request_id"] == "req-42"
    assert ModerationResult.model_validate_json(fields["result"]) == RESULT


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (RedisConnectionError("down"), CallbackFailed),
        (ResponseError("READONLY You can't write against a read only replica."), CallbackFailed),
        (ResponseError("WRONGTYPE Operation against a key"), InvalidCallback),
    ],
)
def test_stream_publisher_errors(error: Exception, raised: type[Exception]) -> None:
    with pytest.raises(raised):
        RedisStreamPublisher(FakeStreams(error=error)).publish("redis-stream://s", RESULT)


def test_stream_uri_names_a_stream_not_a_server() -> None:
    with pytest.raises(InvalidCallback, match="does not take"):
        RedisStreamPublisher(FakeStreams()).publish("redis-stream://s?host=10.0.0.1", RESULT)
    with pytest.raises(InvalidCallback, match="needs a name"):
        RedisStreamPublisher(FakeStreams()).publish("redis-stream://user@evil:6379/s", RESULT)


# -- routing and wiring --------------------------------------------------------------------


def test_router_dispatches_by_scheme() -> None:
    celery, streams, hooks = MemoryPublisher(), MemoryPublisher(), MemoryPublisher()
    router = CallbackRouter(celery=celery, redis_stream=streams, webhook=hooks)
    for uri in ("celery://t", "redis-stream://s", "https://h/x"):
        router.publish(uri, RESULT)
    assert celery.published == [("celery://t", RESULT)]
    assert streams.published == [("redis-stream://s", RESULT)]
    assert hooks.published == [("https://h/x", RESULT)]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://h/x", "'ftp' is not supported; use one of celery://"),
        ("no-scheme", "'\\(none\\)' is not supported"),
        ("http://h/x", "plain http:// webhooks are refused"),
        ("celery://t", "celery:// callbacks are not enabled"),
    ],
)
def test_router_refuses_unconfigured_schemes(uri: str, message: str) -> None:
    router = CallbackRouter(webhook=MemoryPublisher())
    with pytest.raises(InvalidCallback, match=message):
        router.publish(uri, RESULT)


def test_memory_publisher_can_fail_on_demand() -> None:
    publisher = MemoryPublisher()
    publisher.fail_next(CallbackFailed("down"))
    with pytest.raises(CallbackFailed):
        publisher.publish("celery://t", RESULT)
    publisher.publish("celery://t", RESULT)
    assert publisher.published == [("celery://t", RESULT)]


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def test_build_publisher_makes_the_stream_client_on_first_use() -> None:
    urls: list[str] = []
    client = FakeStreams()

    def factory(url: str) -> FakeStreams:
        urls.append(url)
        return client

    settings = _settings(
        broker_url="redis://broker:6379/0", callback_redis_url="redis://callbacks:6379/2"
    )
    send_task = SendTask()
    router = build_publisher(settings.callbacks, settings.http, send_task, factory)
    assert urls == []
    router.publish("redis-stream://results", RESULT)
    router.publish("redis-stream://results", RESULT)
    assert urls == ["redis://callbacks:6379/2"]
    assert len(client.entries) == 2
    router.publish("celery://proj.tasks.x", RESULT)
    assert [name for name, _ in send_task.calls] == ["proj.tasks.x"]
    with pytest.raises(InvalidCallback, match="cannot target"):
        router.publish(f"celery://proj.tasks.x?queue={settings.queue}", RESULT)


def test_build_publisher_without_redis_or_broker_explains() -> None:
    settings = _settings(broker_url="amqp://guest:hunter2@rabbit//")
    router = build_publisher(
        settings.callbacks, settings.http, None, lambda url: pytest.fail("no client expected")
    )
    with pytest.raises(InvalidCallback, match="MODQ_CALLBACK_REDIS_URL") as caught:
        router.publish("redis-stream://results", RESULT)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(InvalidCallback, match="not enabled"):
        router.publish("celery://proj.tasks.x", RESULT)
    with pytest.raises(InvalidCallback, match="MODQ_WEBHOOK_SECRET"):
        router.publish("https://hooks.example.com/x", RESULT)


def test_build_publisher_wires_the_webhook_settings() -> None:
    settings = _settings(
        webhook_secret="hunter2-webhook",
        webhook_retries=1,
        webhook_timeout_s=2.5,
        http_allowed_networks="10.1.0.0/16",
    )
    router = build_publisher(settings.callbacks, settings.http)
    webhook = router.publishers["https"]
    assert isinstance(webhook, WebhookPublisher)
    assert (webhook.retries, webhook.timeout_s) == (1, 2.5)
    assert webhook.guard.is_allowed(ipaddress.ip_address("10.1.2.3"))
    assert "hunter2" not in repr(webhook)
    webhook.close()
