"""Slow-loris servers on loopback: real TCP, answers dripped one byte at a time.

``Trickle`` answers every request with fixed bytes (any bytes: a malformed head is as easy as
a good one), sending the first ``prompt`` bytes at once and the rest one byte every
``interval`` seconds, optionally over TLS. ``Relay`` forwards to another server and drips its
answer (a TLS handshake included) the same way. Both record how many bytes they sent and
when the client hung up.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Relay", "Trickle"]


@dataclass
class _Record:
    sent: int = 0
    #: monotonic time at which sending failed because the client had gone
    hung_up_at: float | None = None


def _drip(conn: socket.socket, data: bytes, prompt: int, interval: float, record: _Record) -> None:
    try:
        if prompt:
            conn.sendall(data[:prompt])
            record.sent += len(data[:prompt])
        for index in range(prompt, len(data)):
            time.sleep(interval)
            conn.sendall(data[index : index + 1])
            record.sent += 1
    except OSError:
        record.hung_up_at = time.monotonic()


def _read_request(conn: socket.socket) -> bytes:
    """A request's head and its Content-Length body (so closing leaves nothing unread)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def _linger(conn: socket.socket) -> None:
    """Wait (briefly) for the client to close first, then close."""
    try:
        conn.settimeout(2.0)
        while conn.recv(65536):
            pass
    except OSError:
        pass
    finally:
        conn.close()


@dataclass
class _Listener:
    listener: socket.socket = field(init=False)
    records: list[_Record] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    def _listen(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = _Record()
            self.records.append(record)
            threading.Thread(target=self._serve, args=(conn, record), daemon=True).start()

    def _serve(self, conn: socket.socket, record: _Record) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Trickle(_Listener):
    def __init__(
        self,
        answer: bytes,
        interval: float,
        prompt: int = 0,
        tls: ssl.SSLContext | None = None,
        delay: float = 0.0,
    ) -> None:
        super().__init__()
        self.answer, self.interval, self.prompt, self.tls, self.delay = (
            answer,
            interval,
            prompt,
            tls,
            delay,
        )
        self.requests: list[bytes] = []
        self._listen()

    def _serve(self, conn: socket.socket, record: _Record) -> None:
        try:
            conn.settimeout(10.0)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.requests.append(_read_request(conn))
            time.sleep(self.delay)
            _drip(conn, self.answer, self.prompt, self.interval, record)
        except OSError:
            record.hung_up_at = time.monotonic()
        finally:
            _linger(conn)


class Relay(_Listener):
    """Forwards each connection to ``127.0.0.1:upstream``; the client's bytes go up at
    once, the upstream's come back one every ``interval`` seconds."""

    def __init__(self, upstream: int, interval: float) -> None:
        super().__init__()
        self.upstream, self.interval = upstream, interval
        self._listen()

    def _serve(self, conn: socket.socket, record: _Record) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=10.0)
        except OSError:
            conn.close()
            return
        threading.Thread(target=self._up, args=(conn, up), daemon=True).start()
        try:
            while data := up.recv(65536):
                _drip(conn, data, 0, self.interval, record)
                if record.hung_up_at is not None:
                    break
        except OSError:
            pass
        finally:
            up.close()
            conn.close()

    @staticmethod
    def _up(conn: socket.socket, up: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                up.sendall(data)
        except OSError:
            pass
