"""The worker's side of one decoder process (``worker.decode.child``): starting it, its pipes,
its end; and the watchdog that kills a decoder whose job passed its CPU-time or wall-time
budget. The decode pool (``worker.decode.pool``) puts them together.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

__all__ = ["CHILD_COMMAND", "DecoderProcess", "Watch", "Watchdog", "cpu_seconds"]

CHILD_COMMAND = (sys.executable, "-I", "-m", "worker.decode.child")
#: how often the watchdog looks at the decoders' CPU time: the most a job overruns its budget
TICK_S = 0.02
_PIPE_BYTES = 1 << 20
#: what a decoder does not inherit from the worker: its settings and credentials
_DROPPED_ENV = ("MODQ_", "AWS_")
_CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class DecoderProcess:
    """One decoder process, started with ``subprocess`` (a fresh interpreter: never a fork
    of a threaded worker holding a model), its stderr discarded."""

    def __init__(self, command: Sequence[str], memory_mb: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
        self.process = subprocess.Popen(
            [*command, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env | _CHILD_ENV,
        )
        for pipe in (self.process.stdin, self.process.stdout):
            _widen(pipe)
        #: jobs sent to it so far
        self.jobs = 0
        #: whether it said READY
        self.ready = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def jobs_in(self) -> IO[bytes]:
        assert self.process.stdin is not None
        return self.process.stdin

    def read(self, size: int) -> bytes:
        assert self.process.stdout is not None
        data = self.process.stdout.read(size)
        if len(data) != size:
            raise EOFError(f"the decoder closed its answer after {len(data)} of {size} bytes")
        return data

    def read_into(self, buffer: bytearray) -> None:
        assert self.process.stdout is not None
        view, got = memoryview(buffer), 0
        while got < len(buffer):
            n = self.process.stdout.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise EOFError(f"the decoder closed its answer after {got} pixel bytes")
            got += n

    def wait_exit(self, seconds: float) -> int | None:
        """Its exit status once it has exited, waiting up to ``seconds``; None if it runs on."""
        try:
            return self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int:
        """Kill and reap it; its exit status (negative: the signal that ended it)."""
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass  # bytes still buffered for a dead decoder have nowhere to go
        return code


@dataclass(eq=False)
class Watch:
    """One job under the watchdog."""

    child: DecoderProcess
    cpu_s: float
    deadline: float
    #: the child's CPU time when the job began (None: wall time only, e.g. during start-up)
    cpu_start: float | None = None
    #: when its CPU time began to count (monotonic)
    cpu_started_at: float = 0.0
    #: why the watchdog killed the child: "cpu" or "wall"
    verdict: str | None = None
    done: bool = False


class Watchdog:
    """One thread per pool: kills (SIGKILL) a decoder whose job used more than its CPU time,
    read from /proc every ``TICK_S``, or outlived its wall-time deadline. A decoder runs one
    thread, so it cannot use its CPU time in less wall time than that: /proc is read only once
    a job has run for half of it (room for a second thread), not for every short decode."""

    def __init__(self) -> None:
        self._watches: set[Watch] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode-watchdog", daemon=True)
        self._thread.start()

    def watch(self, child: DecoderProcess, cpu_s: float, wall_s: float) -> Watch:
        watch = Watch(child, cpu_s, time.monotonic() + wall_s)
        with self._cond:
            self._watches.add(watch)
            self._cond.notify()
        return watch

    def start_cpu(self, watch: Watch) -> None:
        """Count the child's CPU time from now: its start-up is not the job's."""
        start = cpu_seconds(watch.child.pid)
        with self._cond:
            watch.cpu_start = start
            watch.cpu_started_at = time.monotonic()

    def unwatch(self, watch: Watch) -> str | None:
        """The job is over; why the watchdog killed its child, if it did."""
        with self._cond:
            watch.done = True
            self._watches.discard(watch)
            return watch.verdict

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._watches and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                watches = list(self._watches)
            for watch in watches:
                self._check(watch)
            time.sleep(TICK_S)

    def _check(self, watch: Watch) -> None:
        verdict = None
        now = time.monotonic()
        if now > watch.deadline:
            verdict = "wall"
        elif watch.cpu_start is not None and now - watch.cpu_started_at >= watch.cpu_s / 2:
            used = cpu_seconds(watch.child.pid)
            if used is not None and used - watch.cpu_start > watch.cpu_s:
                verdict = "cpu"
        if verdict is None:
            return
        with self._cond:
            # Under the lock: a job that is done may already have handed its child on.
            if watch.done or watch.verdict is not None:
                return
            watch.verdict = verdict
            if watch.child.alive:
                watch.child.process.kill()


def _widen(pipe: IO[bytes] | None) -> None:
    """A 1 MiB pipe (Linux) rather than 64 KiB: a frame crosses in a few writes, not dozens
    of switches between the two processes."""
    # Elsewhere, or under a lower pipe-max-size, the default pipe works, only more slowly.
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of a process, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: the state is the 3rd field of the line, utime and stime the
    # 14th and 15th.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
