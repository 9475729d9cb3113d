"""A bounded pool of decoder processes: the hard backstop behind decode's structural checks.

Structure walked before decoding bounds what an image can cost only as far as the walk
foresees; the pool bounds the rest. Each decode runs in one of ``processes`` decoder
processes (``worker.decode.child``), whose address space is capped at its start-up size plus
``memory_mb``, and whose CPU time for the job is watched: past ``cpu_s`` it is killed (the
watchdog reads its CPU time every 20 ms once the job has run for half its CPU time in wall
time, the least a one-thread decoder needs to spend it; its own RLIMIT_CPU backs that up a
second later),
and past ``wall_s`` of wall time too. Callers queue for a free decoder; one that dies or
lies is replaced, and its caller gets one error::

    over the CPU-time or memory budget      decode_budget_exceeded  permanent: the image
    died of its own signal (SIGSEGV …) or   decoder_crashed         permanent: a crafted
      answered out of protocol                                        input must not come back
    SIGKILLed by someone else (OOM killer)  resource_exhausted      retryable: the machine
    no answer within wall_s, CPU unspent    resource_exhausted      retryable: the machine

What comes back is checked, never unpickled (``worker.decode.wire``). A decoder that ran out
of memory after other jobs is replaced and the image tried once more in a fresh one, so
``decode_budget_exceeded`` never depends on what the decoder held before.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from PIL import Image

from worker.config import DecodeSettings
from worker.decode import DecodedImage, DecodeLimits, decode
from worker.decode.prepare import Prepared, Recipe, decode_prepared
from worker.decode.proc import CHILD_COMMAND, DecoderProcess, Watch, Watchdog
from worker.decode.wire import (
    ERROR,
    EXIT_OUT_OF_MEMORY,
    FRAMES,
    HEADER,
    JOB,
    READY,
    FrameLayout,
    child_error,
    frame_layout,
    pack,
    parse_header,
    parse_json,
    recipe_document,
)
from worker.errors import (
    ConfigError,
    DecodeBudgetExceeded,
    DecoderCrashed,
    ModqError,
    ResourceExhausted,
)
from worker.log import get_logger

__all__ = ["Backstop", "DecodePool", "Decoder", "InProcessDecoder", "build_decoder"]

log = get_logger(__name__)

#: how long a new decoder may take to start (imports on a loaded machine)
_START_S = 60.0


class Decoder(Protocol):
    """What the pipeline decodes with (``PipelineOptions.decoder`` is its ``prepare``), and
    its end."""

    def decode(
        self, data: bytes, limits: DecodeLimits, draft_size: int | None = None
    ) -> DecodedImage: ...

    def prepare(
        self, data: bytes, limits: DecodeLimits, draft_size: int | None, recipe: Recipe
    ) -> Prepared: ...

    def close(self) -> None: ...


class InProcessDecoder:
    """``MODQ_DECODE_PROCESSES=0``: decoding in the caller's thread, bounded only by decode's
    own checks. An input they do not foresee can take the worker's CPU and memory."""

    def decode(
        self, data: bytes, limits: DecodeLimits, draft_size: int | None = None
    ) -> DecodedImage:
        return decode(data, limits, draft_size)

    def prepare(
        self, data: bytes, limits: DecodeLimits, draft_size: int | None, recipe: Recipe
    ) -> Prepared:
        return decode_prepared(data, limits, draft_size, recipe)

    def close(self) -> None:
        pass


def build_decoder(decode: DecodeSettings) -> Decoder:
    """The decode pool the settings ask for (one decoder per core by default)."""
    processes = decode.processes
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        processes = processes or os.cpu_count() or 1
    if processes == 0:
        return InProcessDecoder()
    backstop = Backstop(processes, decode.cpu_s, decode.max_memory_mb, decode.wall_s)
    return DecodePool(backstop)


class _OutOfMemory(DecodeBudgetExceeded):
    """The memory side of ``decode_budget_exceeded`` (a fresh decoder may be asked again)."""


@dataclass(frozen=True)
class Backstop:
    processes: int
    cpu_s: float = 4.0
    memory_mb: int = 1024
    wall_s: float = 20.0


@dataclass(eq=False)
class _Slot:
    """A place for one decoder: its holder may replace the decoder mid-job."""

    child: DecoderProcess | None = None


class DecodePool:
    """``decode`` with the signature of ``worker.decode.decode``, run in a child process.

    Thread-safe: callers beyond ``processes`` wait for a free child. ``command`` starts one
    child (tests start children that misbehave on purpose)."""

    def __init__(self, backstop: Backstop, command: Sequence[str] = CHILD_COMMAND) -> None:
        if backstop.processes < 1:
            raise ValueError("a decode pool needs at least one process")
        self.backstop = backstop
        self.command = tuple(command)
        self._cond = threading.Condition()
        self._idle: list[_Slot] = []
        self._slots: list[_Slot] = []
        self._closed = False
        self._watchdog = Watchdog()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        """Start every child and wait until each is ready: a worker whose decoders cannot
        start must not take messages."""
        for _ in range(self.backstop.processes):
            self._slots.append(_Slot(self._spawn()))
            self._idle.append(self._slots[-1])  # nobody can take one yet; close() stops it
        for slot in self._slots:
            assert slot.child is not None
            watch = self._watchdog.watch(slot.child, self.backstop.cpu_s, _START_S)
            try:
                self._handshake(slot.child)
            except (OSError, EOFError, ModqError) as exc:
                raise ConfigError(
                    f"a decoder process did not start ({' '.join(self.command)}): {exc}"
                ) from exc
            finally:
                self._watchdog.unwatch(watch)

    def pids(self) -> list[int]:
        """The decoder processes now running (for tests and operators)."""
        with self._cond:
            return [s.child.pid for s in self._slots if s.child and s.child.alive]

    def decode(
        self, data: bytes, limits: DecodeLimits, draft_size: int | None = None
    ) -> DecodedImage:
        return self.prepare(data, limits, draft_size, Recipe()).decoded()

    def prepare(
        self, data: bytes, limits: DecodeLimits, draft_size: int | None, recipe: Recipe
    ) -> Prepared:
        """What ``recipe`` asks for from decoding ``data`` (``worker.decode.prepare``)."""
        slot = self._acquire()
        try:
            used = slot.child is not None and slot.child.jobs > 0
            try:
                return self._run(slot, data, limits, draft_size, recipe)
            except _OutOfMemory:
                if not used:
                    raise
            # Out of memory in a child that had decoded other images: ask a fresh one.
            return self._run(slot, data, limits, draft_size, recipe)
        finally:
            self._release(slot)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for slot in idle:
            self._retire(slot, respawn=False)
        self._watchdog.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slots ---------------------------------------------------------------------------

    def _acquire(self) -> _Slot:
        with self._cond:
            while not self._idle and not self._closed:
                self._cond.wait()
            if self._closed:
                raise ResourceExhausted("the decode pool is closed (the worker is stopping)")
            return self._idle.pop()

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(slot)
                self._cond.notify()
                return
        self._retire(slot, respawn=False)

    def _spawn(self) -> DecoderProcess:
        try:
            return DecoderProcess(self.command, self.backstop.memory_mb)
        except OSError as exc:
            raise ResourceExhausted(f"cannot start a decoder process: {exc}") from exc

    def _retire(self, slot: _Slot, respawn: bool = True) -> int | None:
        """Stop the slot's child; start its successor now, so it loads while others work."""
        code = slot.child.stop() if slot.child is not None else None
        slot.child = None
        if respawn and not self._closed:
            try:
                slot.child = self._spawn()
            except ResourceExhausted as exc:
                log.warning("decoder process not replaced", error=str(exc))
        return code

    # -- one job -------------------------------------------------------------------------

    def _run(
        self,
        slot: _Slot,
        data: bytes,
        limits: DecodeLimits,
        draft_size: int | None,
        recipe: Recipe,
    ) -> Prepared:
        if slot.child is None or not slot.child.alive:
            self._retire(slot)
        child = slot.child if slot.child is not None else self._spawn()
        slot.child = child
        watch = self._watchdog.watch(child, self.backstop.cpu_s, self.backstop.wall_s)
        try:
            answer = self._exchange(child, watch, data, limits, draft_size, recipe)
        except (OSError, EOFError, DecoderCrashed) as exc:
            verdict = self._watchdog.unwatch(watch)
            code = child.wait_exit(0.2)  # a child that closed its pipe is on its way out
            self._retire(slot)
            raise self._death(child, verdict, code, exc) from exc
        if isinstance(answer, DecodeBudgetExceeded):
            answer = _OutOfMemory(str(answer))
        if self._watchdog.unwatch(watch) is not None or isinstance(answer, _OutOfMemory):
            self._retire(slot)  # killed as it finished, or its heap is suspect: a fresh one
        if isinstance(answer, ModqError):
            raise answer
        return answer

    def _handshake(self, child: DecoderProcess) -> None:
        _, json_len, payload_len = parse_header(child.read(HEADER.size), (READY,))
        document = parse_json(child.read(json_len))
        if payload_len or document.get("pid") != child.pid:
            raise DecoderCrashed("the decoder process announced itself out of protocol")
        child.ready = True

    def _exchange(
        self,
        child: DecoderProcess,
        watch: Watch,
        data: bytes,
        limits: DecodeLimits,
        draft_size: int | None,
        recipe: Recipe,
    ) -> Prepared | ModqError:
        if not child.ready:
            self._handshake(child)
        self._watchdog.start_cpu(watch)
        child.jobs += 1
        job = _job_header(limits, draft_size, self.backstop.cpu_s, recipe, len(data))
        child.jobs_in.write(job)
        child.jobs_in.write(data)
        child.jobs_in.flush()
        kind, json_len, payload_len = parse_header(child.read(HEADER.size), (FRAMES, ERROR))
        document = parse_json(child.read(json_len))
        if kind == ERROR:
            if payload_len:
                raise DecoderCrashed("the decoder process sent an error with a payload")
            return child_error(document)
        return _images(child, frame_layout(document, payload_len, limits, recipe))

    def _death(
        self, child: DecoderProcess, verdict: str | None, code: int | None, exc: BaseException
    ) -> ModqError:
        """The error for a job whose child died, was killed, or lied."""
        backstop, pid = self.backstop, child.pid
        if verdict == "cpu" or code == -signal.SIGXCPU:
            log.warning("decoder process killed: CPU budget", pid=pid, cpu_s=backstop.cpu_s)
            return DecodeBudgetExceeded(
                f"decoding needs more than {backstop.cpu_s:g} s of CPU time "
                "(MODQ_DECODE_CPU_S); refused"
            )
        if verdict == "wall":
            log.warning(
                "decoder process killed: no answer in time", pid=pid, wall_s=backstop.wall_s
            )
            return ResourceExhausted(
                f"the decoder gave no answer within {backstop.wall_s:g} s of wall time while "
                "under its CPU budget (an overloaded machine?); retry later"
            )
        if isinstance(exc, DecoderCrashed):
            log.warning("decoder process out of protocol", pid=pid, error=str(exc))
            return exc
        if code == EXIT_OUT_OF_MEMORY:
            return _OutOfMemory(
                f"decoding needs more than {backstop.memory_mb} MB (MODQ_DECODE_MAX_MEMORY_MB); "
                "refused"
            )
        if code == -signal.SIGKILL:
            log.warning("decoder process killed from outside", pid=pid)
            return ResourceExhausted(
                "the decoder process was killed from outside (out of memory?); retry later"
            )
        log.warning("decoder process crashed", pid=pid, exit=_describe(code))
        return DecoderCrashed(f"the decoder process died on this image ({_describe(code)})")


@functools.lru_cache(maxsize=64)
def _job_document(
    limits: DecodeLimits, draft_size: int | None, cpu_s: float, recipe: Recipe
) -> bytes:
    # The same few limits come with every image: build their JSON once (asdict deep-copies).
    job = {
        "limits": asdict(limits),
        "draft_size": draft_size,
        "cpu_s": cpu_s,
        "recipe": recipe_document(recipe),
    }
    return pack(JOB, job)[HEADER.size :]


def _job_header(
    limits: DecodeLimits, draft_size: int | None, cpu_s: float, recipe: Recipe, size: int
) -> bytes:
    document = _job_document(limits, draft_size, cpu_s, recipe)
    return HEADER.pack(JOB, len(document), size) + document


def _images(child: DecoderProcess, layout: FrameLayout) -> Prepared:
    frames = tuple(_read_image(child, "RGB", size) for size in layout.sizes if layout.kept)
    side = layout.input_size
    inputs = tuple(_read_image(child, "RGB", (side, side)) for _ in range(layout.inputs))
    reduced = _read_image(child, "L", layout.reduced) if layout.reduced else None
    return Prepared(
        layout.format,
        layout.width,
        layout.height,
        layout.frame_count,
        layout.sizes,
        frames,
        inputs,
        reduced,
    )


def _read_image(child: DecoderProcess, mode: str, size: tuple[int, int]) -> Image.Image:
    pixels = bytearray(len(mode) * size[0] * size[1])
    child.read_into(pixels)
    return Image.frombytes(mode, size, pixels)


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"
