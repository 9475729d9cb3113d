"""A real `modq worker` process for the integration tier, which tests can stop and kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["ROOT", "WorkerProcess", "free_port"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    """``modq worker`` with ``env`` on top of a clean copy of this environment; ready once its
    metrics endpoint answers and the worker said it is ready (the model is loaded).

    ``launcher`` replaces the ``modq`` executable, e.g. ``(python, "-m",
    "tests.support.crash_worker", …)`` to run the same worker with a crash injected."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        args: tuple[str, ...] = (),
        launcher: tuple[str, ...] | None = None,
        separate_stderr: bool = False,
    ) -> None:
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MODQ_")},
            "MODQ_METRICS_PORT": str(self.metrics_port),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.log_path = log_path
        self.args = args
        self.launcher = launcher or (str(Path(sys.executable).with_name("modq")),)
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._err_start = 0
        # stderr in a file of its own, to check what a log shipper reading it would see.
        self.stderr_path = log_path.with_suffix(".stderr") if separate_stderr else None

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()  # a restart must not be ready on the old log
        stderr = self.stderr_path.open("ab") if self.stderr_path else None
        self._err_start = stderr.tell() if stderr else 0
        self.process = subprocess.Popen(
            [*self.launcher, "worker", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=stderr or subprocess.STDOUT,
            start_new_session=True,
        )
        if stderr:
            stderr.close()
        try:
            self._wait_ready(timeout)
        except (RuntimeError, TimeoutError):
            if self.process.poll() is None:  # not ready in time: do not leave it running
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            self._log.close()
            self.process = None
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if "ready." in self.log(since_start=True) and self._metrics_up():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()}")

    def _metrics_up(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").is_success
        except httpx.HTTPError:
            return False

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text

    def log(self, since_start: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start if since_start else 0)
            text = log.read().decode(errors="replace")
        return text + self.stderr(since_start)

    def stderr(self, since_start: bool = False) -> str:
        """What the worker wrote on stderr, when it has a file of its own ("" otherwise)."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        with self.stderr_path.open("rb") as err:
            err.seek(self._err_start if since_start else 0)
            return err.read().decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the worker process now, from /proc."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        [line] = [row for row in status.splitlines() if row.startswith("VmRSS:")]
        return int(line.split()[1]) / 1024

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (Celery's warm shutdown) and wait; returns the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL, as the OOM killer or a lost node would: no shutdown code runs."""
        return self._signal(signal.SIGKILL, 10.0)

    def wait(self, timeout: float) -> int:
        """Wait for a process that ends by itself (an injected crash)."""
        assert self.process is not None
        code = self.process.wait(timeout)
        self._log.close()
        self.process = None
        return code

    def _signal(self, sig: signal.Signals, timeout: float) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait(10)
        self._log.close()
        self.process = None
        return code
