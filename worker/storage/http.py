"""Read-only ``http(s)://`` fetch of untrusted URLs, without reaching the worker's own network.

Every hop (the first URL and each redirect) is resolved through the ``NetworkGuard`` and the
request goes to the exact address the guard approved: the URL's host is swapped for that IP,
the original ``Host`` header is sent, and for ``https`` the original hostname is passed as
``sni_hostname``. httpcore hands that name to ``ssl.wrap_socket(server_hostname=…)``, which
both sends it as SNI and checks the certificate against it (``check_hostname`` is on), so
connecting by IP loses neither virtual hosting nor certificate verification. A certificate that
does not verify for the hostname is a ``ForbiddenReference``, not a retry.

Because connections are made by IP, the client keeps no idle connections: a pooled
connection made for one hostname must never carry a request for another hostname that happens
to resolve to the same address. Redirects are followed here, never by httpx, so each Location
is checked again; at most ``max_redirects`` are followed.

Status mapping: 404 and 410 → ``ObjectNotFound``; 401, 403, 407 and 451 → ``ForbiddenReference``;
408, 425, 429 and 5xx → ``StorageUnavailable`` (retryable), as are timeouts and connection
errors; any other 4xx, a redirect whose Location is missing, empty, repeated or not a URL
(``http://[::1``, a bad port, control characters), and a status line or header the HTTP
parser refuses → ``InvalidReference`` (the request as written cannot succeed, and retrying
will not change that).

Bodies are read raw with ``Accept-Encoding: identity`` and a byte cap (Content-Length first,
then while streaming). A server that compresses anyway is refused: decoding gzip on the fly
could expand a small chunk a thousandfold before the cap is checked. No cookies are kept, no
proxy, netrc or credentials come from the environment, and URLs carrying user:password are
refused. The whole read, redirects included, has one deadline (three times the per-operation
timeout unless set): every socket operation, from connect and the TLS handshake through the
status line, headers and body, gets only the time left (``worker.storage.deadline``), so a
server that drips one byte at a time, anywhere in the exchange, cannot hold a task thread past
it. Running out of time is a retryable ``StorageUnavailable``, like any timeout.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
import threading
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

from worker.errors import (
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ObjectNotFound,
    StorageUnavailable,
)
from worker.storage.netguard import NetworkGuard

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpStore"]

CHUNK_BYTES = 1 << 16
USER_AGENT = "modq (image moderation)"
_NOT_FOUND = frozenset({404, 410})
_FORBIDDEN = frozenset({401, 403, 407, 451})
_TRANSIENT = frozenset({408, 425, 429})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_LOCATION = "modq.location"
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


class HttpStore:
    def __init__(
        self,
        guard: NetworkGuard,
        timeout_s: float,
        max_redirects: int = 5,
        transport: httpx.BaseTransport | None = None,
        *,
        verify: ssl.SSLContext | bool = True,
        deadline_s: float | None = None,
    ) -> None:
        self.guard = guard
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.deadline_s = deadline_s if deadline_s is not None else 3 * timeout_s
        self._transport = transport
        self._verify = verify
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        """The shared client, created on first use (importing httpx only then)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._new_client()
        return self._client

    def _new_client(self) -> httpx.Client:
        import httpx

        from worker.storage.deadline import DeadlineTransport

        # Only the CA settings come from the environment (SSL_CERT_FILE / SSL_CERT_DIR, for
        # a private CA), as for webhooks; proxies and netrc never do.
        verify = self._verify
        context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
        return httpx.Client(
            transport=self._transport or DeadlineTransport(context),
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
            follow_redirects=False,
            trust_env=False,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            headers={"User-Agent": USER_AGENT},
            event_hooks={"response": [_take_location]},
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def read(self, ref: str, max_bytes: int) -> bytes:
        import httpx

        try:
            url = _checked_url(httpx.URL(ref), ref)
        except (httpx.InvalidURL, ValueError) as exc:
            raise InvalidReference(f"{ref!r} is not a valid URL: {exc}") from exc
        deadline = time.monotonic() + self.deadline_s
        for _ in range(self.max_redirects + 1):
            body, location = self._hop(url, ref, max_bytes, deadline)
            if location is None:
                return body
            url = location
        raise InvalidReference(f"{ref}: more than {self.max_redirects} redirects")

    def _hop(
        self, url: httpx.URL, ref: str, max_bytes: int, deadline: float
    ) -> tuple[bytes, httpx.URL | None]:
        """The body at ``url``, or the checked URL it redirects to."""
        import httpx

        from worker.storage.deadline import within

        if time.monotonic() > deadline:
            raise StorageUnavailable(f"{ref}: {self._late}")
        request = self._pinned_request(url)
        try:
            with within(deadline):
                response = self._send(request, ref, url)
                try:
                    if response.status_code in _REDIRECTS:
                        return b"", _redirect_target(url, response, ref)
                    _check_status(response, ref)
                    return _read_capped(response, max_bytes, ref, deadline, self._late), None
                finally:
                    response.close()
        except httpx.TimeoutException as exc:
            late = self._late if time.monotonic() >= deadline else "timed out"
            raise StorageUnavailable(f"{ref}: {url.host} {late}") from exc
        except httpx.TransportError as exc:
            if _is_certificate_error(exc):
                raise ForbiddenReference(f"{ref}: {url.host}'s certificate: {exc}") from exc
            raise StorageUnavailable(f"{ref}: cannot fetch from {url.host}: {exc}") from exc

    def _send(self, request: httpx.Request, ref: str, url: httpx.URL) -> httpx.Response:
        import httpx

        try:
            return self.client.send(request, stream=True)
        except httpx.RemoteProtocolError as exc:
            # A status line or header the HTTP parser refuses (a Location with control
            # characters, say) is what this server answers, every time; a connection that
            # closed before answering is not, and stays retryable.
            if _refused_by_parser(exc):
                raise InvalidReference(f"{ref}: {url.host} answered no valid HTTP: {exc}") from exc
            raise

    @property
    def _late(self) -> str:
        return f"did not finish the download within its {self.deadline_s:g} s deadline"

    def _pinned_request(self, url: httpx.URL) -> httpx.Request:
        """A GET for ``url`` sent to the address the guard approved for its host."""
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        address = self.guard.resolve(host, port)
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        return self.client.build_request(
            "GET",
            url.copy_with(host=address, fragment=None),
            headers={
                "Host": url.netloc.decode("ascii"),
                "Accept": "image/*, */*;q=0.5",
                "Accept-Encoding": "identity",
            },
            extensions=extensions,
        )


def _checked_url(url: httpx.URL, ref: str) -> httpx.URL:
    if url.scheme not in ("http", "https"):
        raise InvalidReference(f"{ref!r}: only http and https URLs are fetched")
    if not _is_host(url.raw_host.decode("ascii")):
        raise InvalidReference(f"{ref!r} has no valid host")
    if url.userinfo:
        raise InvalidReference(f"{ref!r}: URLs carrying credentials are refused")
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidReference(f"{ref!r}: port {url.port} is out of range")
    return url


def _is_host(host: str) -> bool:
    if "%" in host:  # an IPv6 zone: no business in a URL from a request
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None
    return True


def _redirect_target(url: httpx.URL, response: httpx.Response, ref: str) -> httpx.URL:
    import httpx

    locations = response.extensions.get(_LOCATION) or []
    if len(locations) != 1 or not locations[0].strip():
        raise InvalidReference(f"{ref}: a {response.status_code} without one usable Location")
    location = locations[0]
    try:
        # Joined against the URL as named (a hostname), not the IP the request went to.
        return _checked_url(url.join(location), ref)
    except (httpx.InvalidURL, ValueError) as exc:
        raise InvalidReference(f"{ref}: bad redirect to {location!r}") from exc


def _take_location(response: httpx.Response) -> None:
    """Move Location out of httpx's sight: even when not following redirects, httpx builds
    the next request from it and fails the whole send, as a retryable transport error, on one
    it cannot parse. ``_redirect_target`` judges it instead."""
    if "Location" in response.headers:
        response.extensions[_LOCATION] = response.headers.get_list("Location")
        del response.headers["Location"]


def _check_status(response: httpx.Response, ref: str) -> None:
    status = response.status_code
    message = f"{ref}: the server answered {status}"
    if 200 <= status < 300:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidReference(f"{ref}: served with Content-Encoding {encoding!r}")
        return
    if status in _NOT_FOUND:
        raise ObjectNotFound(message)
    if status in _FORBIDDEN:
        raise ForbiddenReference(message)
    if status in _TRANSIENT or status >= 500:
        raise StorageUnavailable(message)
    raise InvalidReference(message)


def _read_capped(
    response: httpx.Response, max_bytes: int, ref: str, deadline: float, late: str
) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"{ref} is {declared} bytes, over the {max_bytes} limit")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_raw(CHUNK_BYTES):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLarge(f"{ref} is over the {max_bytes}-byte limit")
        if time.monotonic() > deadline:
            raise StorageUnavailable(f"{ref}: {late}")
    return b"".join(chunks)


def _refused_by_parser(exc: BaseException) -> bool:
    import h11

    return any(isinstance(seen, h11.RemoteProtocolError) for seen in _chain(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_certificate_error(exc: BaseException) -> bool:
    return any(isinstance(seen, ssl.SSLCertVerificationError) for seen in _chain(exc))
