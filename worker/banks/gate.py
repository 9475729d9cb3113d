"""The pipeline's bank check: whether an image must be matched, and the match.

Two rules decide what happens when the bank Redis cannot be read:

- once this process has seen an enabled bank, a failed read raises ``BankUnavailable``
  (retryable): the image waits for the banks rather than being scored without them;
- a process that has never seen an enabled bank (none configured, or Redis unreachable
  since it started) classifies without banks, as it does without the verdict cache, so a
  deployment that uses no banks keeps working when that Redis is down.

The list of enabled banks is read at most every ``refresh_s`` seconds: a bank added or
disabled takes effect within that time. Images whose PDQ quality is under the gate (flat,
tiny, featureless) are never matched: PDQ itself says their hash carries no signal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.banks.base import BankMatch, BankStore
from worker.banks.pdq import PDQ_MAX_DISTANCE, PDQ_QUALITY_MIN, PdqHash
from worker.config import Settings
from worker.errors import BankUnavailable
from worker.log import get_logger

__all__ = ["BankGate"]

log = get_logger(__name__)


class BankGate:
    def __init__(
        self,
        store: BankStore,
        max_distance: int = PDQ_MAX_DISTANCE,
        quality_min: int = PDQ_QUALITY_MIN,
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.max_distance = max_distance
        self.quality_min = quality_min
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._enabled: tuple[str, ...] = ()
        self._read_at: float | None = None
        self._ever_enabled = False

    @classmethod
    def from_settings(cls, settings: Settings, url: str) -> BankGate:
        """The gate over the banks on the Redis at ``url``, with the settings' limits."""
        from worker.banks.redis import RedisBankStore

        return cls(
            RedisBankStore(url, settings.cache_prefix),
            settings.bank_max_distance,
            settings.bank_quality_min,
        )

    def active(self) -> bool:
        """Whether any bank is enabled (so images must be hashed and matched)."""
        with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self.refresh_s:
                return bool(self._enabled)
            try:
                banks = self.store.banks()
            except BankUnavailable as exc:
                self._read_at = now  # back off: an unreachable Redis is not asked per image
                if self._ever_enabled:
                    raise
                log.warning("hash banks unreadable; none seen yet, classifying", error=str(exc))
                return False
            self._enabled = tuple(b.name for b in banks if b.enabled)
            self._read_at = now
            self._ever_enabled = self._ever_enabled or bool(self._enabled)
            return bool(self._enabled)

    def check(self, pdq: PdqHash) -> BankMatch | None:
        if pdq.quality < self.quality_min:
            return None
        return self.store.match(pdq.hex, self.max_distance)

    def close(self) -> None:
        self.store.close()
