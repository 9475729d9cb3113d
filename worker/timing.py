"""Per-request stopwatch: where one image's time went, as the result's ``Timings``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.messages import Timings

__all__ = ["Clock"]


@dataclass
class Clock:
    started: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = self.started

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = self.marks.get(name, 0.0) + (now - self.last) * 1000
        self.last = now

    def timings(self, infer_ms: float = 0.0) -> Timings:
        wait_ms = self.marks.get("wait", 0.0)
        return Timings(
            fetch_ms=round(self.marks.get("fetch", 0.0), 3),
            decode_ms=round(self.marks.get("decode", 0.0), 3),
            queue_ms=round(max(0.0, wait_ms - infer_ms), 3),
            infer_ms=round(infer_ms, 3),
            total_ms=round((time.perf_counter() - self.started) * 1000, 3),
        )
