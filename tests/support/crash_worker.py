"""`modq worker` with a crash injected at one point of the delivery path.

    python -m tests.support.crash_worker --at quarantine-delete --marker FILE worker [ARGS]

The first thread to reach the point creates ``FILE`` and kills the whole process with
SIGKILL (no cleanup runs, as when a node dies); with ``FILE`` present the same command runs
a normal worker, so the redelivered message goes through. The points:

- ``quarantine-delete``: the verified copy and its record are in quarantine, the source is
  not yet deleted;
- ``publish-ack``: the result is published, the message is not yet acked;
- ``deliver``: the Redis transport has popped the message (``BRPOP``) and not yet recorded
  it as unacked, the gap where the broker itself forgets it.

The worker's own code is unchanged: the crash wraps the real methods from outside.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["POINTS", "main"]


def _crash_once(marker: Path) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _before(function: Callable[..., Any], marker: Path) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _crash_once(marker)
        return function(*args, **kwargs)

    return wrapper


def _after(function: Callable[..., Any], marker: Path) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        _crash_once(marker)
        return result

    return wrapper


def _quarantine_delete(marker: Path) -> None:
    from worker.quarantine import local, s3

    s3.S3Quarantine._delete_source = _before(s3.S3Quarantine._delete_source, marker)  # type: ignore[method-assign]
    s3.delete_verified_file = _before(s3.delete_verified_file, marker)
    local.LocalQuarantine._delete_source = staticmethod(  # type: ignore[method-assign]
        _before(local.LocalQuarantine._delete_source, marker)
    )


def _publish_ack(marker: Path) -> None:
    from worker.queue.service import ModerationService

    ModerationService._publish = _after(ModerationService._publish, marker)  # type: ignore[method-assign]


def _deliver(marker: Path) -> None:
    from kombu.transport import redis

    redis.QoS.append = _before(redis.QoS.append, marker)  # type: ignore[method-assign]


POINTS: dict[str, Callable[[Path], None]] = {
    "quarantine-delete": _quarantine_delete,
    "publish-ack": _publish_ack,
    "deliver": _deliver,
}


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[0] != "--at" or argv[2] != "--marker" or argv[1] not in POINTS:
        raise SystemExit(f"usage: crash_worker --at {{{','.join(POINTS)}}} --marker FILE ARGS")
    POINTS[argv[1]](Path(argv[3]))
    from worker.cli import main as modq

    sys.argv = ["modq", *argv[4:]]
    modq()


if __name__ == "__main__":
    main(sys.argv[1:])
