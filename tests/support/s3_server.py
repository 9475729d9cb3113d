"""A real S3-compatible server for integration tests: moto's server mode in a subprocess.

The tests own the process, so they can stop it (to see how the worker behaves while S3 is
down) and start it again on the same port. moto keeps its state in memory: a restart starts
from an empty store. Credentials are dummies handed to each client explicitly; the test
process's environment is left alone.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.storage.s3 import create_s3_client

__all__ = ["CREDENTIALS", "S3Server", "free_port"]

CREDENTIALS = {
    "aws_access_key_id": "test",
    "aws_secret_access_key": "test",
    "region_name": "us-east-1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class S3Server:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkdtemp(prefix="moto-")) / "server.log"
        self._admin: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 20.0) -> None:
        if self.running:
            return
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        return self._log.read_text(errors="replace")[-chars:] if self._log.exists() else ""

    def client(self) -> Any:
        """A new boto3 S3 client for this server, configured as the worker configures its own."""
        return create_s3_client(self.endpoint_url, **CREDENTIALS)

    @property
    def admin(self) -> Any:
        """One shared client for setting up and inspecting buckets (boto3 clients are
        thread-safe, and each new one costs a fraction of a second)."""
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    def create_bucket(self, name: str, versioned: bool = False) -> str:
        client = self.admin
        client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            connection.request("GET", "/moto-api/")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()
