"""A decoder process: ``python -I -m worker.decode.child MEMORY_MB``.

Reads JOB messages on stdin and answers each with FRAMES or ERROR on stdout
(``worker.decode.wire``), one at a time, until stdin closes: the images its recipe asks for
(``worker.decode.prepare``). Its address space is capped at
its size after start-up plus ``MEMORY_MB``, and before each job its CPU-time soft limit is
set a second past the job's budget, so it dies of SIGXCPU even if the worker's watchdog
cannot see it. Running out of that memory is a fact about the image here (the cap is the
decoder's own), so it is reported as ``decode_budget_exceeded``, not as the in-process
decoder's retryable ``resource_exhausted``.

SIGINT and SIGTERM are ignored: a worker's warm shutdown signals its whole process group,
and the decodes in flight must finish; the decoder leaves when the worker closes its stdin.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
from typing import IO, Any

from worker.decode import DecodeLimits, decode
from worker.decode.prepare import Prepared, Recipe, prepare
from worker.decode.wire import (
    ERROR,
    EXIT_OUT_OF_MEMORY,
    FRAMES,
    HEADER,
    JOB,
    READY,
    pack,
    read_recipe,
)
from worker.errors import DecodeBudgetExceeded, ImageError, ResourceExhausted


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    memory_mb = int(argv[1])
    jobs, answers = _protocol_streams()
    _cap_address_space(memory_mb)
    _send(answers, pack(READY, {"pid": os.getpid()}))
    while True:
        header = jobs.read(HEADER.size)
        if len(header) < HEADER.size:
            return 0  # the worker closed the pipe: time to go
        kind, json_len, data_len = HEADER.unpack(header)
        if kind != JOB:
            return 2
        request: dict[str, Any] = json.loads(jobs.read(json_len))
        data = jobs.read(data_len)
        if len(data) != data_len:
            return 0
        _cap_cpu(float(request["cpu_s"]))
        try:
            _answer(
                answers,
                data,
                DecodeLimits(**request["limits"]),
                request["draft_size"],
                read_recipe(request.get("recipe")),
            )
        except MemoryError:
            os._exit(EXIT_OUT_OF_MEMORY)


def _answer(
    answers: IO[bytes], data: bytes, limits: DecodeLimits, draft: int | None, recipe: Recipe
) -> None:
    try:
        prepared = prepare(decode(data, limits, draft), recipe)
    except (ResourceExhausted, MemoryError):
        error = DecodeBudgetExceeded(
            "the image needs more memory to decode than the decode backstop allows"
        )
        _send(answers, pack(ERROR, {"code": error.code, "message": str(error)}))
        return
    except ImageError as exc:
        _send(answers, pack(ERROR, {"code": exc.code, "message": str(exc)}))
        return
    except Exception as exc:  # a bug in modq, not a property of the image
        _send(answers, pack(ERROR, {"code": "internal", "message": repr(exc)}))
        return
    _send_images(answers, prepared)


def _send_images(answers: IO[bytes], prepared: Prepared) -> None:
    reduced = prepared.reduced
    images = [*prepared.frames, *prepared.inputs, *([reduced] if reduced is not None else [])]
    document = {
        "format": prepared.format,
        "width": prepared.width,
        "height": prepared.height,
        "frame_count": prepared.frame_count,
        "frames": [list(size) for size in prepared.sizes],
        "kept": bool(prepared.frames),
        "inputs": len(prepared.inputs),
        "reduced": None if reduced is None else list(reduced.size),
    }
    payload = sum(len(image.getbands()) * image.width * image.height for image in images)
    answers.write(pack(FRAMES, document, payload))
    for image in images:
        answers.write(image.tobytes())  # the frames: at most 150 MB at the default pixel cap
    answers.flush()


def _send(answers: IO[bytes], message: bytes) -> None:
    answers.write(message)
    answers.flush()


def _protocol_streams() -> tuple[IO[bytes], IO[bytes]]:
    """The protocol's own copies of stdin and stdout; fds 0 and 1 then point at /dev/null and
    stderr, so a stray print or a library's chatter can never corrupt an answer."""
    jobs = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    answers = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return jobs, answers


def _cap_address_space(memory_mb: int) -> None:
    try:
        with open("/proc/self/statm") as statm:
            baseline = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return  # no /proc: the CPU limit and the worker's watchdog still hold
    cap = baseline + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _cap_cpu(cpu_s: float) -> None:
    """The soft CPU limit a second past this job's budget (it counts whole seconds of the
    process's life); the hard limit is left alone, so the next job can raise it again."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(used.ru_utime + used.ru_stime + cpu_s) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
