"""The pipeline's bank check: whether an image must be matched, and the match.

Every front end and ``modq bank`` find the banks the same way: on ``MODQ_BANK_URL``, else on
the verdict cache's Redis (``MODQ_CACHE_URL``). Three rules decide what happens when that Redis
cannot be read:

- before the first image (``probe``): a store named explicitly (``MODQ_BANK_URL``, or a
  ``MODQ_CACHE_URL`` set in the environment) that cannot be read stops the process with a
  ``ConfigError`` naming the setting: it cannot know whether banks are switched on. Only the
  built-in default Redis, unreachable, means no banks (a first ``modq scan`` needs no Redis);
- later, when ``MODQ_BANK_URL`` is set (``required``) or once this process has seen an
  enabled bank, a failed read raises ``BankUnavailable`` (retryable): the image waits for the
  banks (in ``modq scan``, an error result), never an answer without them;
- a process on the fallback that found no enabled bank classifies without banks through a
  later outage, as it does without the verdict cache: a deployment that uses no banks keeps
  working while that Redis is down. A worker (``until_read``) must first have read the list
  once: one that started while the built-in default Redis was unreachable makes its images
  wait until a read succeeds; only ``modq scan`` goes on without banks then.

The list of enabled banks is read at most every ``refresh_s`` seconds: a bank added or
disabled takes effect within that time. Images whose PDQ quality is under the gate (flat,
tiny, featureless) are never matched: PDQ itself says their hash carries no signal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.banks.base import BankInfo, BankMatch, BankStore
from worker.config import BankSettings
from worker.errors import BankUnavailable, ConfigError
from worker.hashing.pdq import PDQ_MAX_DISTANCE, PDQ_QUALITY_MIN, PdqHash
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
        *,
        required: bool = False,
        explicit: str | None = None,
        until_read: bool = False,
    ) -> None:
        """``required``: every failed read is ``BankUnavailable``; ``explicit``: the setting
        that named the store, which must be readable before the first image; ``until_read``:
        failed reads are ``BankUnavailable`` until one read has succeeded (a worker)."""
        self.store = store
        self.required = required
        self.explicit = explicit
        self.until_read = until_read
        self._read_once = False
        self.max_distance = max_distance
        self.quality_min = quality_min
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._enabled: tuple[str, ...] = ()
        self._read_at: float | None = None
        self._ever_enabled = False

    @classmethod
    def from_settings(cls, banks: BankSettings, *, until_read: bool = False) -> BankGate | None:
        """The gate over the banks ``modq bank`` writes to (``MODQ_BANK_URL``, else
        ``MODQ_CACHE_URL``), with the settings' limits; ``None`` when both are empty."""
        from worker.banks.redis import RedisBankStore

        if not banks.url:
            return None
        return cls(
            RedisBankStore(banks.url, banks.prefix),
            banks.max_distance,
            banks.quality_min,
            required=banks.named_by == "MODQ_BANK_URL",
            explicit=banks.named_by,
            until_read=until_read,
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
                if self.required or self._ever_enabled or (self.until_read and not self._read_once):
                    raise
                log.warning("hash banks unreadable; none seen yet, classifying", error=str(exc))
                return False
            self._record(banks, now)
            return bool(self._enabled)

    def _record(self, banks: list[BankInfo], now: float) -> None:
        self._enabled = tuple(b.name for b in banks if b.enabled)
        self._read_at = now
        self._read_once = True
        self._ever_enabled = self._ever_enabled or bool(self._enabled)

    def probe(self) -> None:
        """Read the list of banks now, before any image: a store named explicitly that cannot
        be read is a deployment that cannot moderate as configured."""
        try:
            banks = self.store.banks()
        except BankUnavailable as exc:
            if self.explicit is not None:
                raise ConfigError(
                    f"{self.explicit}: the hash banks cannot be read, so whether any are "
                    f"switched on is unknown: {exc}"
                ) from exc
            log.warning("hash banks unreadable at the default Redis; classifying without them")
            return
        with self._lock:
            self._record(banks, self._clock())

    def check(self, pdq: PdqHash) -> BankMatch | None:
        if pdq.quality < self.quality_min:
            return None
        return self.store.match(pdq.hex, self.max_distance)

    def close(self) -> None:
        self.store.close()
