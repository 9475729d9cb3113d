"""`modq worker` with failures injected at the stages of a delivery, for chosen requests.

    MODQ_TEST_FAULTS='{"raise": {"assess": 1, ...}, "kill": ["assess"]}' \\
        python -m tests.support.fault_worker worker [ARGS]

``raise``: the stage raises ``RuntimeError`` for a request whose id contains
``fault-<stage>``, the given number of times in this process (then it passes); ``-1`` means
every time. ``kill``: the stage kills the whole process with SIGKILL (as the OOM killer would)
for a request whose id contains ``poison``, every time, after a short pause so that the
requests beside it are in flight too. The worker's own code is unchanged: the faults wrap its
real methods from outside, reading the request id the task bound to the log context.

Stages, in delivery order: ``validate`` (the message becomes a request), ``stored`` (the
result store is read and the lease taken, one step), ``assess`` (the pipeline), ``store``
(the result is stored), ``act`` (the quarantine action), ``publish`` (the callback),
``dead-letter``, ``forget`` (the producers' record).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["STAGES", "main"]

STAGES = ("validate", "stored", "assess", "store", "act", "publish", "dead-letter", "forget")

_lock = threading.Lock()


def _request_id(args: tuple[Any, ...]) -> str:
    import structlog

    bound = structlog.contextvars.get_contextvars().get("request_id")
    if bound:
        return str(bound)
    for arg in args:  # outside the bound context: the raw message, or the request itself
        if isinstance(arg, dict) and "request_id" in arg:
            return str(arg["request_id"])
        if isinstance(getattr(arg, "request_id", None), str):
            return str(arg.request_id)
    return ""


def _faulty(function: Callable[..., Any], stage: str, times: int, kill: bool) -> Callable[..., Any]:
    left = [times]

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        request_id = _request_id(args)
        if kill and "poison" in request_id:
            sys.stderr.write(f"fault: killing the process at {stage} for {request_id}\n")
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        if not kill and f"fault-{stage}" in request_id:
            with _lock:
                fire = left[0] != 0
                left[0] -= 1 if left[0] > 0 else 0
            if fire:
                sys.stderr.write(f"fault: raising at {stage} for {request_id}\n")
                raise RuntimeError(f"injected fault at {stage}")
        return function(*args, **kwargs)

    return wrapper


def _targets() -> dict[str, tuple[Any, str]]:
    from worker.actions import Actions
    from worker.pipeline import Pipeline
    from worker.queue import tasks
    from worker.queue.service import ModerationService

    return {
        "validate": (tasks, "ModerationRequest"),
        "stored": (ModerationService, "_look"),
        "assess": (Pipeline, "assess"),
        "store": (ModerationService, "_store"),
        "act": (Actions, "act"),
        "publish": (ModerationService, "_publish"),
        "dead-letter": (tasks, "_dead_letter"),
        "forget": (tasks, "_forget"),
    }


def _install(stage: str, times: int, kill: bool) -> None:
    owner, name = _targets()[stage]
    if stage == "validate":
        model = getattr(owner, name)

        class Faulty(model):  # type: ignore[misc, valid-type]
            model_validate = classmethod(  # type: ignore[assignment]
                _faulty(lambda cls, message: model.model_validate(message), stage, times, kill)
            )

        setattr(owner, name, Faulty)
        return
    setattr(owner, name, _faulty(getattr(owner, name), stage, times, kill))


def main(argv: list[str]) -> None:
    spec = json.loads(os.environ.get("MODQ_TEST_FAULTS", "{}"))
    for stage, times in spec.get("raise", {}).items():
        _install(stage, int(times), kill=False)
    for stage in spec.get("kill", []):
        _install(stage, -1, kill=True)
    from worker.cli import main as modq

    sys.argv = ["modq", *argv]
    modq()


if __name__ == "__main__":
    main(sys.argv[1:])
