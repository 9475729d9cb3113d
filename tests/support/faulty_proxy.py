"""A TCP proxy in front of the test S3 server that the fault tests switch between states.

moto keeps its objects in memory, so stopping moto itself would also lose the uploads. The
worker talks to this proxy instead, and the proxy is what goes away:

- ``up``: every connection is piped to the real server, byte for byte;
- ``down``: the listening socket is closed (connection refused, as for a stopped server)
  and open connections are cut;
- ``failing``: every request is read and answered ``503 SlowDown`` in S3's XML, as an
  overloaded S3 or MinIO answers.

It keeps its port across states, as a restarted server would.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from typing import Literal

__all__ = ["FaultyProxy"]

State = Literal["up", "down", "failing"]

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


class FaultyProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.state: State = "down"
        self.port = 0
        self.failed_requests = 0
        self.piped_connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_state(self, state: State) -> None:
        with self._lock:
            self.state = state
            self._cut_open_connections()
        if state == "down":
            self._close_listener()
        elif self._listener is None:
            self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _cut_open_connections(self) -> None:
        for sock in list(self._open):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: state "down"
            with self._lock:
                state = self.state
                self._open.add(client)
            handler = self._fail if state == "failing" else self._pipe
            threading.Thread(target=handler, args=(client,), daemon=True).start()

    def _fail(self, client: socket.socket) -> None:
        """Answer every request on this connection 503 until the client hangs up."""
        reader = client.makefile("rb")
        with suppress(OSError, ValueError):
            while True:
                length = _read_request_head(reader)
                if length is None:
                    break
                reader.read(length)
                with self._lock:
                    self.failed_requests += 1
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(_SLOW_DOWN)}\r\n\r\n".encode()
                    + _SLOW_DOWN
                )
        self._forget(client)

    def _pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            self._forget(client)
            return
        server.settimeout(None)
        with self._lock:
            self._open.add(server)
            self.piped_connections += 1
        threading.Thread(target=_pump, args=(server, client), daemon=True).start()
        _pump(client, server)
        self._forget(client)
        self._forget(server)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with suppress(OSError):
            sock.close()

    def close(self) -> None:
        self.set_state("down")


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _read_request_head(reader: object) -> int | None:
    """Read one request's head; returns its body length, or None at end of stream.
    boto3 sends bodies with Content-Length (chunked uploads are not used over this proxy)."""
    length = 0
    first = True
    while True:
        line = reader.readline(65537)  # type: ignore[attr-defined]
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            if first:
                continue
            return length
        first = False
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
