"""HttpStore against a real local HTTP(S) server: pinned addresses, SSRF refusals, caps.

The server listens on 127.0.0.1, which the guard refuses unless a test allows 127.0.0.1/32.
Hostnames come from an injected resolver, so a test decides where each name "resolves".
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.tls import TlsFiles, make_tls
from worker.errors import (
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ModqError,
    ObjectNotFound,
    StorageUnavailable,
)
from worker.storage import HttpStore, NetworkGuard

IMAGE = b"\xff\xd8\xff\xe0 an image " + bytes(range(256)) * 40
ENDLESS_BYTES = 64 * 1024 * 1024
LOCAL = ("127.0.0.1/32",)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[tuple[str, dict[str, str]]]
    #: bytes of body each streaming route wrote before the client hung up
    sent: dict[str, int]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up early on purpose (caps, refused certificates)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    routes: ClassVar[dict[str, Callable[[_Handler], None]]] = {}

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers.items())))
        route = self.routes.get(urlsplit(self.path).path, _Handler.status(404))
        route(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    @staticmethod
    def status(code: int) -> Callable[[_Handler], None]:
        return lambda handler: handler.reply(code, b"no")

    def image(self) -> None:
        self.reply(200, IMAGE, Content_Type="image/jpeg", Set_Cookie="session=abc; Path=/")

    def chunked(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(4):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(IMAGE), IMAGE))
        self.wfile.write(b"0\r\n\r\n")

    def redirect(self) -> None:
        target = parse_qs(urlsplit(self.path).query)["to"][0]
        self.reply(302, Location=target)

    def endless(self) -> None:
        """A chunked body of ``ENDLESS_BYTES``, written until the client hangs up."""
        sent = 0
        chunk = IMAGE * 6
        try:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while sent < ENDLESS_BYTES:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass
        finally:
            self.server.sent[self.path] = sent

    def slow(self) -> None:
        threading.Event().wait(1.0)
        self.reply(200, IMAGE)


_Handler.routes = {
    "/img": _Handler.image,
    "/chunked": _Handler.chunked,
    "/endless": _Handler.endless,
    "/redirect": _Handler.redirect,
    "/loop": lambda handler: handler.reply(302, Location="/loop"),
    "/gzip": lambda handler: handler.reply(200, IMAGE, Content_Encoding="gzip"),
    "/slow": _Handler.slow,
    "/gone": _Handler.status(410),
    "/forbidden": _Handler.status(403),
    "/unauthorized": _Handler.status(401),
    "/busy": _Handler.status(503),
    "/ratelimited": _Handler.status(429),
    "/teapot": _Handler.status(418),
}


def _serve(wrap: Callable[[_Server], None] | None = None) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.seen = []
    server.sent = {}
    if wrap is not None:
        wrap(server)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def server() -> Iterator[_Server]:
    yield from _serve()


@pytest.fixture
def port(server: _Server) -> int:
    return int(server.server_address[1])


def _store(names: dict[str, str], allowed: tuple[str, ...] = LOCAL, **options: Any) -> HttpStore:
    def resolve(host: str, port: int) -> list[str]:
        return [names[host]]

    options.setdefault("timeout_s", 2.0)
    return HttpStore(NetworkGuard(allowed, resolver=resolve), **options)


@pytest.fixture
def store() -> Iterator[HttpStore]:
    store = _store({"images.test": "127.0.0.1", "cdn.test": "127.0.0.1"})
    yield store
    store.close()


# --- reads -------------------------------------------------------------------------------------


def test_reads_from_the_checked_address_with_the_original_host(
    store: HttpStore, server: _Server, port: int
) -> None:
    url = f"http://images.test:{port}/img"
    assert store.read(url, len(IMAGE)) == IMAGE
    assert store.read(url, len(IMAGE)) == IMAGE
    (path, first), (_, second) = server.seen
    assert path == "/img"
    assert first["Host"] == f"images.test:{port}"
    assert first["Accept-Encoding"] == "identity"
    assert "Cookie" not in second  # the Set-Cookie of the first answer was not kept


def test_follows_redirects_rechecking_each_host(
    store: HttpStore, server: _Server, port: int
) -> None:
    hop = f"http://cdn.test:{port}/redirect?to=/img"
    url = f"http://images.test:{port}/redirect?to={hop.replace('?', '%3F').replace('=', '%3D')}"
    assert store.read(url, len(IMAGE)) == IMAGE
    assert [headers["Host"] for _, headers in server.seen] == [
        f"images.test:{port}",
        f"cdn.test:{port}",
        f"cdn.test:{port}",
    ]


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "tls", dns_names=("images.test",))


@pytest.fixture
def tls_server(tls: TlsFiles) -> Iterator[_Server]:
    context = tls.server_context()

    def wrap(server: _Server) -> None:
        server.socket = context.wrap_socket(server.socket, server_side=True)

    yield from _serve(wrap)


def test_https_checks_the_certificate_against_the_hostname(
    tls_server: _Server, tls: TlsFiles
) -> None:
    port = tls_server.server_address[1]
    names = {"images.test": "127.0.0.1", "impostor.test": "127.0.0.1"}
    store = _store(names, verify=tls.client_context())
    try:
        assert store.read(f"https://images.test:{port}/img", len(IMAGE)) == IMAGE
        assert tls_server.seen[0][1]["Host"] == f"images.test:{port}"
        # Same address, but the certificate is not for this name: refused, not retried.
        with pytest.raises(ForbiddenReference, match="certificate"):
            store.read(f"https://impostor.test:{port}/img", len(IMAGE))
    finally:
        store.close()
    untrusting = _store(names)  # the system's CAs do not know the test CA
    with pytest.raises(ForbiddenReference, match="certificate"):
        untrusting.read(f"https://images.test:{port}/img", len(IMAGE))
    untrusting.close()
    assert len(tls_server.seen) == 1


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["10.1.2.3", "127.0.0.1", "169.254.169.254", "::1", "192.168.1.5", "fd00::1"]
)
def test_a_name_resolving_to_a_private_address_is_never_connected(address: str) -> None:
    attempts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(200, content=IMAGE)

    transport = httpx.MockTransport(handler)
    store = _store({"evil.test": address}, allowed=(), transport=transport)
    with pytest.raises(ForbiddenReference, match=address):
        store.read("http://evil.test/a.jpg", 1 << 20)
    assert attempts == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img",
        "http://[::ffff:127.0.0.1]:{port}/img",
        "http://local.test:{port}/img",
    ],
)
def test_the_local_server_is_unreachable_without_an_allowance(
    server: _Server, port: int, url: str
) -> None:
    store = _store({"local.test": "127.0.0.1"}, allowed=())
    with pytest.raises(ForbiddenReference):
        store.read(url.format(port=port), 1 << 20)
    assert server.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "http://metadata.test/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.2:{port}/img",
        "http://[::1]:{port}/img",
    ],
)
def test_a_redirect_to_a_forbidden_address_is_refused(
    server: _Server, port: int, target: str
) -> None:
    names = {"images.test": "127.0.0.1", "metadata.test": "169.254.169.254"}
    store = _store(names)
    location = target.format(port=port)
    with pytest.raises(ForbiddenReference):
        store.read(f"http://images.test:{port}/redirect?to={location}", 1 << 20)
    assert [path for path, _ in server.seen] == [f"/redirect?to={location}"]


def test_redirect_loop_is_capped(server: _Server, port: int) -> None:
    store = _store({"images.test": "127.0.0.1"}, max_redirects=3)
    with pytest.raises(InvalidReference, match="redirects"):
        store.read(f"http://images.test:{port}/loop", 1 << 20)
    assert len(server.seen) == 4


@pytest.mark.parametrize(
    "ref",
    [
        "ftp://images.test/a.jpg",
        "file:///etc/passwd",
        "http://user:secret@images.test/a.jpg",
        "http:///a.jpg",
        "http://[not-an-address/a.jpg",
    ],
)
def test_bad_urls_are_invalid(store: HttpStore, ref: str) -> None:
    with pytest.raises(InvalidReference):
        store.read(ref, 1 << 20)


# --- caps, statuses, failures ------------------------------------------------------------------


def test_oversize_with_content_length(store: HttpStore, server: _Server, port: int) -> None:
    with pytest.raises(ImageTooLarge, match="over"):
        store.read(f"http://images.test:{port}/img", len(IMAGE) - 1)


def test_oversize_without_content_length(store: HttpStore, port: int) -> None:
    url = f"http://images.test:{port}/chunked"
    assert store.read(url, 4 * len(IMAGE)) == IMAGE * 4
    with pytest.raises(ImageTooLarge):
        store.read(url, 4 * len(IMAGE) - 1)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/missing", ObjectNotFound),
        ("/gone", ObjectNotFound),
        ("/forbidden", ForbiddenReference),
        ("/unauthorized", ForbiddenReference),
        ("/busy", StorageUnavailable),
        ("/ratelimited", StorageUnavailable),
        ("/teapot", InvalidReference),
        ("/gzip", InvalidReference),
    ],
)
def test_status_mapping(store: HttpStore, port: int, path: str, error: type[ModqError]) -> None:
    with pytest.raises(error) as info:
        store.read(f"http://images.test:{port}{path}", 1 << 20)
    assert info.value.retryable is (error is StorageUnavailable)
    assert "images.test" in str(info.value)


def test_timeout_is_retryable(server: _Server, port: int) -> None:
    store = _store({"images.test": "127.0.0.1"}, timeout_s=0.2)
    with pytest.raises(StorageUnavailable, match="timed out"):
        store.read(f"http://images.test:{port}/slow", 1 << 20)
    store.close()


def test_connection_refused_is_retryable(store: HttpStore) -> None:
    with _Server(("127.0.0.1", 0), _Handler) as closed:
        port = closed.server_address[1]  # bound, closed again before the read
    with pytest.raises(StorageUnavailable):
        store.read(f"http://images.test:{port}/img", 1 << 20)


def test_client_is_created_on_first_read() -> None:
    assert _store({})._client is None


# --- no connection is even attempted -------------------------------------------------------


class _ConnectSpy:
    """Records every ``socket.connect``/``connect_ex`` in this process. ``refuse`` makes each
    fail without touching the network; otherwise the real call goes ahead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: bool = True) -> None:
        self.calls: list[Any] = []
        real_connect = socket.socket.connect

        def connect(sock: socket.socket, address: Any) -> Any:
            self.calls.append(address[:2])
            if refuse:
                raise ConnectionRefusedError(111, "refused by the test's connect spy")
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            self.calls.append(address[:2])
            return 111

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> _ConnectSpy:
    return _ConnectSpy(monkeypatch)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.jpg",
        "https://127.0.0.1/a.jpg",
        "http://[::1]/a.jpg",
        "https://[::1]:8443/a.jpg",
        "http://10.0.0.1/a.jpg",
        "http://172.16.0.1/a.jpg",
        "http://192.168.1.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00::1]/a.jpg",
        "http://100.64.0.1/a.jpg",
        "http://0.0.0.0/a.jpg",
        "http://2130706433/a.jpg",  # 127.0.0.1 as one number
        "http://127.1/a.jpg",
        "http://0x7f.1/a.jpg",
    ],
)
def test_a_private_address_is_refused_before_any_connect_call(
    connects: _ConnectSpy, url: str
) -> None:
    store = HttpStore(NetworkGuard(()), timeout_s=2.0)  # the real transport and resolver
    with pytest.raises(ForbiddenReference):
        store.read(url, 1 << 20)
    store.close()
    assert connects.calls == []


def test_the_connect_spy_sees_a_connect_when_the_network_is_allowed(
    connects: _ConnectSpy,
) -> None:
    store = HttpStore(NetworkGuard(("10.0.0.0/8",)), timeout_s=2.0)
    with pytest.raises(StorageUnavailable):
        store.read("http://10.0.0.1/a.jpg", 1 << 20)
    store.close()
    assert connects.calls == [("10.0.0.1", 80)]


@pytest.mark.parametrize(
    "answers",
    [["10.0.0.1"], ["169.254.169.254"], ["fd00::1"], ["93.184.216.34", "192.168.1.1"]],
    ids=["10/8", "metadata", "ula", "public-and-private"],
)
def test_a_name_resolving_to_a_private_address_makes_no_connect_call(
    connects: _ConnectSpy, answers: list[str]
) -> None:
    store = HttpStore(NetworkGuard((), resolver=lambda host, port: answers), timeout_s=2.0)
    with pytest.raises(ForbiddenReference):
        store.read("https://evil.test/a.jpg", 1 << 20)
    store.close()
    assert connects.calls == []


def test_localhost_through_the_system_resolver_makes_no_connect_call(
    connects: _ConnectSpy,
) -> None:
    store = HttpStore(NetworkGuard(()), timeout_s=2.0)
    with pytest.raises(ForbiddenReference, match="localhost resolves to"):
        store.read("http://localhost/a.jpg", 1 << 20)
    store.close()
    assert connects.calls == []


@pytest.mark.parametrize(
    "target",
    [
        "http://[::1]:{port}/img",
        "http://127.0.0.2:{port}/img",
        "http://10.0.0.1/img",
        "http://169.254.169.254/latest/meta-data/",
        "//[::1]:{port}/img",
    ],
)
def test_a_redirect_to_a_private_address_connects_only_to_the_first_host(
    server: _Server, port: int, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store({"images.test": "127.0.0.1"})
    location = target.format(port=port)
    spy = _ConnectSpy(monkeypatch, refuse=False)
    with pytest.raises(ForbiddenReference):
        store.read(f"http://images.test:{port}/redirect?to={location}", 1 << 20)
    store.close()
    assert spy.calls == [("127.0.0.1", port)]


def test_an_oversize_stream_is_cut_off_near_the_cap(store: HttpStore, server: _Server) -> None:
    cap = 1 << 20
    port = server.server_address[1]
    with pytest.raises(ImageTooLarge):
        store.read(f"http://images.test:{port}/endless", cap)
    deadline = time.monotonic() + 30
    while "/endless" not in server.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    # What the server could write: the cap, one read chunk and the socket buffers.
    assert cap < server.sent["/endless"] < ENDLESS_BYTES // 4
