"""The bank seam: ``BankStore`` and its in-memory fake, ``MemoryBankStore``.

A bank is a named set of PDQ hashes of known-bad images (an operator's own, or a list shared
through an industry programme). Each image is checked against every enabled bank before the
model runs; a hit within the match distance is a match, whatever the model would say.
Disabling a bank stops its matches without deleting its hashes.

Every store keeps the same contract (tests/integration/test_banks_redis.py runs one suite on
both): ``add`` is idempotent and returns how many hashes were new; ``match`` returns the closest
hash within the distance among enabled banks, ties going to the lowest bank name, then to the
lowest hash.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.errors import ConfigError, InvalidHashList, UnknownBank
from worker.hashing.pdq import PDQ_MAX_DISTANCE, format_pdq, parse_pdq
from worker.hashing.pdq_index import MultiIndex, flips_for

__all__ = [
    "BankInfo",
    "BankMatch",
    "BankStore",
    "MemoryBankStore",
    "check_bank_name",
    "parse_hashes",
    "unknown_bank",
]

_BANK_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class BankMatch:
    bank: str
    distance: int
    hash: str  # the bank's hash, 64 lowercase hex digits


@dataclass(frozen=True)
class BankInfo:
    name: str
    enabled: bool
    count: int
    created: float  # epoch seconds
    source: str  # where the bank's first hashes came from (a file name, a programme)


def check_bank_name(name: str) -> str:
    if not _BANK_NAME.fullmatch(name):
        raise ConfigError(
            f"bad bank name {name[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )
    return name


def parse_hashes(hashes: Sequence[str]) -> list[int]:
    """Every hash's value, or nothing: one bad hash rejects them all, so a half-valid list
    never half-lands in a bank."""
    values = []
    for position, text in enumerate(hashes, start=1):
        try:
            values.append(parse_pdq(text))
        except ValueError as exc:
            raise InvalidHashList(f"hash {position} of {len(hashes)}: {exc}") from exc
    return values


def unknown_bank(name: str) -> UnknownBank:
    return UnknownBank(f"no bank named {name!r}; `modq bank list` shows the banks")


class BankStore(ABC):
    """Where banks live. Methods follow an operator's order: fill, list, switch, then match."""

    @abstractmethod
    def add(self, name: str, hashes: Sequence[str], source: str) -> int:
        """Add PDQ hashes (64 hex digits each) to bank ``name``, creating it enabled if it is
        missing; returns how many were not in the bank yet. A bad hash adds nothing."""

    @abstractmethod
    def banks(self) -> list[BankInfo]:
        """Every bank, by name."""

    @abstractmethod
    def set_enabled(self, name: str, enabled: bool) -> None:
        """Switch a bank's matching on or off; an unknown name is a ``ConfigError``."""

    @abstractmethod
    def match(self, hex_hash: str, max_distance: int = PDQ_MAX_DISTANCE) -> BankMatch | None:
        """The closest banked hash within ``max_distance`` among enabled banks, or None."""

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections the store opened itself."""


@dataclass
class _MemoryBank:
    created: float
    source: str
    enabled: bool = True
    index: MultiIndex = field(default_factory=MultiIndex)


class MemoryBankStore(BankStore):
    """Banks in this process's memory: for tests and for `modq scan`, which has no Redis."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._banks: dict[str, _MemoryBank] = {}

    def add(self, name: str, hashes: Sequence[str], source: str) -> int:
        check_bank_name(name)
        values = parse_hashes(hashes)
        with self._lock:
            bank = self._banks.setdefault(name, _MemoryBank(self._clock(), source))
        return sum(bank.index.add(value) for value in values)

    def banks(self) -> list[BankInfo]:
        with self._lock:
            banks = sorted(self._banks.items())
        return [
            BankInfo(name, bank.enabled, len(bank.index), bank.created, bank.source)
            for name, bank in banks
        ]

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._lock:
            if name not in self._banks:
                raise unknown_bank(name)
            self._banks[name].enabled = enabled

    def match(self, hex_hash: str, max_distance: int = PDQ_MAX_DISTANCE) -> BankMatch | None:
        value = parse_pdq(hex_hash)
        flips_for(max_distance)  # refuse a bad radius even when no bank is enabled
        with self._lock:
            enabled = sorted((n, b.index) for n, b in self._banks.items() if b.enabled)
        best: tuple[int, str, int] | None = None
        for name, index in enabled:
            for candidate, distance in index.within(value, max_distance).items():
                key = (distance, name, candidate)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        distance, name, candidate = best
        return BankMatch(name, distance, format_pdq(candidate))
