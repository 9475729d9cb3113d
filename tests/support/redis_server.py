"""A real ``redis-server`` the tests own, so they can kill it, hang it and start it again.

It listens on a free loopback port (never the machine's own Redis), persists nothing unless
asked to be durable (append-only file, fsync always), and keeps
its port across restarts, which is what a Redis restart looks like to a worker.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

__all__ = ["DATABASES", "RedisServer", "free_port", "redis_server_binary"]

_DEFAULT_PORT = 6379  # someone else's Redis: never ours
#: databases of a test server: a broker/cache pair for every test that runs a worker
DATABASES = 256


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    if port == _DEFAULT_PORT:
        return free_port()
    return port


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, *, durable: bool = False) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        if self.port == _DEFAULT_PORT:
            raise ValueError("refusing the default Redis port: it belongs to the machine")
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def persistence(self) -> list[str]:
        """A durable server writes every command to its append-only file before answering
        (what a broker that must not lose a message needs), so a kill -9 loses nothing."""
        if not self.durable:
            return ["--save", "", "--appendonly", "no"]
        return ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.process is not None:
            raise RuntimeError("this redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--logfile", str(self.log_path),
                "--daemonize", "no",
                "--databases", str(DATABASES),  # one pair per worker test
                *self.persistence,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server did not answer PING:\n{log[-2000:]}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to its clients), as a crash would."""
        if self.process is None:
            return
        self.resume()
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections open but nothing answers, as with a hung server."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
