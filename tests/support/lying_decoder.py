"""A decoder process that misbehaves on purpose, for the decode pool's tests:
``python -m tests.support.lying_decoder LIE MEMORY_MB``.

It announces itself as the real decoder does (``worker.decode.child``), reads each job in
full, then answers it with the lie named by ``LIE``, as a subverted decoder could.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import time

from worker.decode.wire import ERROR, FRAMES, HEADER, JOB, READY, pack

__all__ = ["LIES", "PREPARED", "PREPARED_BYTES", "main"]

_FRAME = {
    "format": "PNG",
    "width": 10,
    "height": 10,
    "frame_count": 1,
    "frames": [[10, 10]],
    "kept": True,
    "inputs": 0,
    "reduced": None,
}
#: the answer to ``PREPARE``: no frames, one 224x224 input and the 10x10 reduction
_PREPARED = _FRAME | {"kept": False, "inputs": 1, "reduced": [10, 10]}
PREPARED_BYTES = 3 * 224 * 224 + 10 * 10


def _frames(**changes: object) -> bytes:
    document = _FRAME | changes
    sizes = document["frames"]
    assert isinstance(sizes, list)
    return pack(FRAMES, document, sum(3 * w * h for w, h in sizes))


def _prepared(payload: int = PREPARED_BYTES, **changes: object) -> bytes:
    return pack(FRAMES, _PREPARED | changes, payload)


#: what a job whose recipe fits a 224 input, keeps no frame and reduces the first is
#: answered with (tests.unit.test_decodepool's PREPARE): the honest answer, then lies
PREPARED: dict[str, bytes] = {
    "honest": _prepared() + b"\x00" * PREPARED_BYTES,
    # frames that were not asked for, announced with their bytes
    "unasked_frames": _prepared(PREPARED_BYTES + 300, kept=True),
    "no_inputs": _prepared(100, inputs=0),
    "extra_inputs": _prepared(PREPARED_BYTES + 3 * 224 * 224, inputs=2),
    "bool_inputs": _prepared(inputs=True),
    # a reduction larger than the frame it reduces, bytes and all
    "wide_reduction": _prepared(PREPARED_BYTES + 10, reduced=[11, 10]),
    "no_reduction": _prepared(PREPARED_BYTES - 100, reduced=None),
    # smaller than the reduction of that frame (honest: the frame's own 10x10), bytes and all
    "small_reduction": _prepared(PREPARED_BYTES - 75, reduced=[5, 5]),
    "bad_reduction": _prepared(reduced=[10]),
    "payload": _prepared(PREPARED_BYTES - 1),
}
#: each lie: the bytes sent for a job (``None``: the lie is an action, below)
LIES: dict[str, bytes | None] = {
    # frames a thousand times the pixel cap: the worker must refuse before allocating them
    "oversize": _frames(width=100_000, height=100_000, frames=[[100_000, 100_000]]),
    # a payload length that is not the frames' RGB bytes
    "mismatch": pack(FRAMES, _FRAME, 7),
    # more frames than the image has
    "extra_frames": _frames(frame_count=1, frames=[[10, 10], [10, 10]]),
    # a frame size that is no size
    "negative": _frames(frames=[[-10, -30]]),
    "bool_size": _frames(width=True),
    "format": _frames(format="PNG\n../../etc"),
    # a header promising 2 GiB of JSON
    "huge_json": HEADER.pack(FRAMES, 1 << 31, 0),
    "not_json": HEADER.pack(FRAMES, 9, 0) + b"{not json",
    "deep_json": HEADER.pack(FRAMES, 60_000, 0) + b"[" * 60_000,
    "not_object": HEADER.pack(FRAMES, 2, 0) + b"[]",
    "unknown_kind": HEADER.pack(b"EVIL", 2, 0) + b"{}",
    "unknown_code": pack(ERROR, {"code": "totally_fine", "message": "trust me"}),
    "error_with_payload": pack(ERROR, {"code": "corrupt_image", "message": "x"}, 10),
    # a pickle where the header belongs: it must never be unpickled
    "pickle": pickle.dumps({"format": "PNG", "frames": []}),
    # a reduction to a job that asked for none (the frames alone)
    "unasked_reduction": _frames(reduced=[5, 5]),
    # half an answer, then gone
    "short": _frames() + b"\x00" * 10,
    "segv": None,
    "stall": None,
    "spin": None,
    "env": None,
}


def _act(lie: str) -> None:
    if lie == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif lie == "stall":
        time.sleep(3600)
    elif lie == "spin":
        while True:
            pass
    elif lie == "env":
        # what a subverted decoder could read of the worker's environment
        message = json.dumps(sorted(os.environ))
        sys.stdout.buffer.write(pack(ERROR, {"code": "corrupt_image", "message": message}))


def main(argv: list[str]) -> int:
    lie = argv[1]
    out, jobs = sys.stdout.buffer, sys.stdin.buffer
    if lie == "bad_ready":
        out.write(pack(READY, {"pid": os.getpid() + 1}))
    else:
        out.write(pack(READY, {"pid": os.getpid()}))
    out.flush()
    while True:
        header = jobs.read(HEADER.size)
        if len(header) < HEADER.size:
            return 0
        kind, json_len, data_len = HEADER.unpack(header)
        assert kind == JOB
        jobs.read(json_len)
        jobs.read(data_len)
        answer = PREPARED[lie] if lie in PREPARED else LIES[lie]
        if answer is None:
            _act(lie)
        else:
            out.write(answer)
        out.flush()
        if lie == "short":
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
