"""One deadline for a whole download or webhook delivery, against real slow-loris servers on
loopback; redirects whose Location is no URL are permanent errors.

Each server drips its answer one byte every ``DRIP`` seconds: well inside the per-operation
timeout, so only the whole-exchange deadline can stop it. Each case has a control: the same
server dripping fast enough to finish inside the deadline is read in full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Observe
from tests.support.tls import TlsFiles, make_tls
from tests.support.trickle import Relay, Trickle
from worker.callbacks.webhook import WebhookPublisher
from worker.errors import CallbackFailed, InvalidCallback, InvalidReference, StorageUnavailable
from worker.messages import ModerationResult, Status
from worker.storage import HttpStore, NetworkGuard

TIMEOUT_S = 0.6  # per socket operation
DEADLINE_S = 1.5  # the whole exchange
DRIP = 0.2  # seconds between bytes: never trips the per-operation timeout
FAST = 0.002
SLACK_S = 0.6  # scheduling on a busy machine; the drip alone would take many seconds
BODY = b"\xff\xd8\xff\xe0" + bytes(range(60))
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(BODY)
NAMES = {"images.test": "127.0.0.1", "hooks.test": "127.0.0.1"}


def _store(**options: Any) -> HttpStore:
    options.setdefault("timeout_s", TIMEOUT_S)
    options.setdefault("deadline_s", DEADLINE_S)
    guard = NetworkGuard(("127.0.0.1/32",), resolver=lambda host, port: [NAMES[host]])
    return HttpStore(guard, **options)


def _timed(call: Callable[[], object]) -> tuple[float, BaseException | None, object]:
    start = time.monotonic()
    try:
        result = call()
    except Exception as exc:  # the error is what the tests look at
        return time.monotonic() - start, exc, None
    return time.monotonic() - start, None, result


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "tls", dns_names=tuple(NAMES))


@pytest.fixture
def store() -> Iterator[HttpStore]:
    store = _store()
    yield store
    store.close()


def _assert_cut_by_deadline(
    elapsed: float, error: BaseException | None, server: Trickle | Relay, answer: int
) -> None:
    assert isinstance(error, StorageUnavailable), error
    assert error.retryable and error.code == "storage_unavailable"
    assert "deadline" in str(error), error
    assert DEADLINE_S - 0.05 <= elapsed <= DEADLINE_S + SLACK_S, elapsed
    record = server.records[-1]
    assert record.sent < answer, "the whole answer arrived: nothing was cut"
    # The worker hung up: the server could not finish dripping.
    give_up = time.monotonic() + 3
    while record.hung_up_at is None and time.monotonic() < give_up:
        time.sleep(0.05)
    assert record.hung_up_at is not None


def test_a_status_line_and_headers_dripped_byte_by_byte_are_cut_at_the_deadline(
    store: HttpStore, observe: Observe
) -> None:
    answer = HEAD + BODY
    with Trickle(answer, interval=FAST) as fast:
        assert store.read(f"http://images.test:{fast.port}/a.jpg", 1 << 20) == BODY
    with Trickle(answer, interval=DRIP) as slow:
        elapsed, error, _ = _timed(
            lambda: store.read(f"http://images.test:{slow.port}/a.jpg", 1 << 20)
        )
        _assert_cut_by_deadline(elapsed, error, slow, len(answer))
        sent = slow.records[-1].sent
    assert sent < len(HEAD)  # cut inside the head
    observe(
        "ref.http_slowloris",
        f"headers: a server dripping its status line and headers one byte every {DRIP} s "
        f"(per-operation timeout {TIMEOUT_S} s, deadline {DEADLINE_S} s) → "
        f"`{getattr(error, 'code', error)}` after {elapsed:.2f} s, {sent} of {len(HEAD)} head "
        f"bytes sent (the drip alone would take {len(answer) * DRIP:.0f} s); the same server "
        f"dripping every {FAST} s → the image",
        sent=1,
        received=1,
    )


def test_a_body_dripped_byte_by_byte_is_cut_at_the_deadline(store: HttpStore) -> None:
    answer = HEAD + BODY
    with Trickle(answer, interval=FAST, prompt=len(HEAD)) as fast:
        assert store.read(f"http://images.test:{fast.port}/a.jpg", 1 << 20) == BODY
    with Trickle(answer, interval=DRIP, prompt=len(HEAD)) as slow:
        elapsed, error, _ = _timed(
            lambda: store.read(f"http://images.test:{slow.port}/a.jpg", 1 << 20)
        )
        _assert_cut_by_deadline(elapsed, error, slow, len(answer))


def test_a_dripped_tls_handshake_is_cut_at_the_deadline(tls: TlsFiles) -> None:
    # CPython bounds a handshake by the socket timeout as a whole; with a per-operation
    # timeout longer than the deadline, only the deadline can end this one in time.
    store = _store(verify=tls.client_context(), timeout_s=10 * DEADLINE_S)
    answer = HEAD + BODY
    with Trickle(answer, interval=0, prompt=len(answer), tls=tls.server_context()) as origin:
        with Relay(origin.port, interval=0) as relay:
            assert store.read(f"https://images.test:{relay.port}/a.jpg", 1 << 20) == BODY
        with Relay(origin.port, interval=DRIP / 4) as relay:
            elapsed, error, _ = _timed(
                lambda: store.read(f"https://images.test:{relay.port}/a.jpg", 1 << 20)
            )
            _assert_cut_by_deadline(elapsed, error, relay, 1000)
    store.close()


def test_the_deadline_spans_redirects(store: HttpStore) -> None:
    """Each hop answers in 0.4 s, inside every per-operation timeout; ten of them would take
    4 s and end in 'too many redirects'. The deadline ends the chain first."""
    hop = b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n\r\n"
    chained = _store(max_redirects=10)
    with Trickle(hop, interval=0, prompt=len(hop), delay=0.4) as server:
        elapsed, error, _ = _timed(
            lambda: chained.read(f"http://images.test:{server.port}/first", 1 << 20)
        )
    chained.close()
    assert isinstance(error, StorageUnavailable) and "deadline" in str(error), error
    assert DEADLINE_S - 0.05 <= elapsed <= DEADLINE_S + SLACK_S, elapsed
    assert 2 <= len(server.requests) <= 5


def _result() -> ModerationResult:
    return ModerationResult(request_id="r-1", image="s3://uploads/a.jpg", status=Status.OK)


def test_a_webhook_receiver_dripping_its_answer_is_cut_at_the_deadline(
    tls: TlsFiles, observe: Observe
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    guard = NetworkGuard(("127.0.0.1/32",), resolver=lambda host, port: [NAMES[host]])

    def publisher(retries: int) -> WebhookPublisher:
        return WebhookPublisher(
            guard,
            "secret",
            retries=retries,
            timeout_s=TIMEOUT_S,
            max_total_s=DEADLINE_S,
            backoff_s=0.01,
            verify=tls.client_context(),
        )

    with Trickle(answer, interval=FAST, tls=tls.server_context()) as fast:
        one = publisher(0)
        one.publish(f"https://hooks.test:{fast.port}/hook", _result())
        one.close()
    assert fast.requests and fast.requests[0].startswith(b"POST /hook ")
    with Trickle(answer, interval=DRIP, tls=tls.server_context()) as slow:
        one, several = publisher(0), publisher(5)
        url = f"https://hooks.test:{slow.port}/"
        single, error, _ = _timed(lambda: one.publish(url, _result()))
        total, total_error, _ = _timed(lambda: several.publish(url, _result()))
        one.close()
        several.close()
    assert isinstance(error, CallbackFailed) and "no answer within" in str(error), error
    assert TIMEOUT_S - 0.05 <= single <= TIMEOUT_S + SLACK_S, single
    assert isinstance(total_error, CallbackFailed), total_error
    assert total <= DEADLINE_S + SLACK_S, total
    observe(
        "ref.webhook_slowloris",
        f"a webhook receiver dripping its status line one byte every {DRIP} s: one attempt "
        f"(timeout {TIMEOUT_S} s) → `{getattr(error, 'code', error)}` after {single:.2f} s; "
        f"with retries inside a {DEADLINE_S} s publish budget → "
        f"`{getattr(total_error, 'code', total_error)}` after {total:.2f} s; the same "
        f"receiver dripping every {FAST} s → delivered",
        sent=2,
        received=2,
    )


# --- redirects whose Location is no URL ---------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        b"http://[::1",
        b"http://a b/",
        b"http://images.test:port/",
        b"http://images.test:99999/",
        b"http://images.test:0/",
        b"http://images.test:-1/",
        b"",
        b"   ",
        b"http://a\x01b/",
        b"http://a/\x7f",
        b"http://a\tb/",
        b"http://a%2fb/",
        b"http://[fe80::1%25eth0]/",
        b"http://[v1.x]/",
        b"http://a.b\xe2\x80\x8b/",
        b"gopher://images.test/",
        b"http://user:pw@images.test/",
    ],
)
def test_an_unusable_redirect_location_is_a_permanent_error(
    store: HttpStore, location: bytes
) -> None:
    answer = b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"
    server = Trickle(answer, interval=0, prompt=len(answer))
    with server, pytest.raises(InvalidReference) as info:
        store.read(f"http://images.test:{server.port}/a.jpg", 1 << 20)
    assert not info.value.retryable
    assert len(server.requests) == 1  # refused, never followed


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /a\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent\x00Type: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ],
)
def test_a_redirect_without_one_location_or_a_malformed_head_is_permanent(
    store: HttpStore, head: bytes
) -> None:
    server = Trickle(head, interval=0, prompt=len(head))
    with server, pytest.raises(InvalidReference):
        store.read(f"http://images.test:{server.port}/a.jpg", 1 << 20)


def test_a_server_that_closes_without_answering_stays_retryable(store: HttpStore) -> None:
    server = Trickle(b"HTTP/1.1 200", interval=0, prompt=12)
    with server, pytest.raises(StorageUnavailable):
        store.read(f"http://images.test:{server.port}/a.jpg", 1 << 20)


def test_out_of_range_ports_are_invalid(store: HttpStore) -> None:
    for port in (0, 65536, 99999):
        with pytest.raises(InvalidReference, match="port"):
            store.read(f"http://images.test:{port}/a.jpg", 1 << 20)


@pytest.mark.parametrize("location", [b"http://[::1", b"http://a:port/", b"", b"/fine"])
def test_a_webhook_redirect_is_refused_for_good_whatever_its_location(
    tls: TlsFiles, location: bytes
) -> None:
    answer = b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"
    guard = NetworkGuard(("127.0.0.1/32",), resolver=lambda host, port: [NAMES[host]])
    publisher = WebhookPublisher(guard, "secret", retries=3, verify=tls.client_context())
    server = Trickle(answer, interval=0, prompt=len(answer), tls=tls.server_context())
    with server, pytest.raises(InvalidCallback, match="redirects are not followed"):
        publisher.publish(f"https://hooks.test:{server.port}/hook", _result())
    publisher.close()
    assert len(server.requests) == 1  # not retried


@pytest.mark.parametrize("port", [0, 65536, 99999])
def test_a_webhook_port_out_of_range_is_refused_for_good(port: int) -> None:
    guard = NetworkGuard(("127.0.0.1/32",), resolver=lambda host, port: [NAMES[host]])
    publisher = WebhookPublisher(guard, "secret", retries=3)
    with pytest.raises(InvalidCallback, match="port"):
        publisher.publish(f"https://hooks.test:{port}/hook", _result())
    publisher.close()
