"""One deadline for a whole HTTP exchange: connect, TLS handshake, headers and body.

httpx's timeouts apply to each socket operation, so a server that sends one byte of its
status line or headers every ``timeout - 1`` seconds never trips them and can hold a task
thread for as long as it likes. Inside ``within(deadline)``, every operation of a
``DeadlineTransport``'s connections is given only the time left until ``deadline`` (a
``time.monotonic()`` value) and fails at once when none is left; the caller sets the scope
around the request and the reading of its body. CPython's TLS handshake keeps its own
deadline across the records it waits for, so a dripped handshake is bounded too.

Time running out raises httpx's timeout errors (``ConnectTimeout``, ``ReadTimeout``,
``WriteTimeout``), so callers classify it as they classify any timeout.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

__all__ = ["DeadlineTransport", "within"]

_deadline: ContextVar[float | None] = ContextVar("modq_http_deadline", default=None)
# Writes go out in pieces so each send is given the time left, not the time it started with.
_WRITE_PIECE = 1 << 14


@contextmanager
def within(deadline: float) -> Iterator[None]:
    """Bound every socket operation of ``DeadlineTransport`` in this context by ``deadline``."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to the time left before the deadline of the current scope."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired("the deadline for the whole exchange passed")
    return remaining if timeout is None else min(timeout, remaining)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout=_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        sock = self._inner.get_extra_info("socket")
        if not isinstance(sock, socket.socket):  # not a plain or TLS socket: whole writes
            self._inner.write(buffer, timeout=_left(timeout, httpcore.WriteTimeout))
            return
        view = memoryview(buffer)
        try:
            while view:
                sock.settimeout(_left(timeout, httpcore.WriteTimeout))
                view = view[sock.send(view[:_WRITE_PIECE]) :]
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout=bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport, its connections made through the deadline-bounded backend.
    No proxy and no kept-alive connections (connections go to pinned addresses)."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_keepalive_connections=0,
            network_backend=_Backend(),
        )
