"""Banks in Redis, shared by every worker, with a multi-index over each bank's PDQ hashes.

Every key lives under one prefix; nothing else is read or written::

    {prefix}:v1:bank:registry              hash: bank name -> JSON {created, source, enabled}
    {prefix}:v1:bank:{name}:hashes         set of the bank's hashes (raw 32 bytes): what is in
                                           the bank, so adds are idempotent and counts exact
    {prefix}:v1:bank:{name}:mih:{i}:{cccc} string: the raw 32-byte hashes whose 16-bit chunk i
                                           is cccc (hex), concatenated
                                           (``worker.hashing.pdq_index``)

The index entries are append-only strings of raw hashes rather than sets, for speed: a match
reads 272 keys per bank with one MGET and gets back 272 byte strings, which numpy splits into
32-byte rows and compares in one vectorised pass. With sets, SUNION answers with one reply item
per candidate (about 4,000 at a million hashes): about five times the client CPU per match,
and twice the Redis memory on Redis 7.0 (``bench/banks.py --compare-sets``). Raw bytes rather
than hex halve both the memory and the bytes read per match. A duplicate record (two
adds of the same new hash racing, or an add retried after a crash) changes no match.

An add writes a batch's index records, then its set members, then (once) the registry entry:
a hash in the set is fully indexed, the count is the set's size, and a bank whose first add
crashed is not listed at all until an add finishes. Re-running the add completes it.

A match is one round trip: the registry and the index keys of the banks that were enabled at
the previous match go in one pipeline; a bank enabled since then costs a second one. Any Redis
failure (or unreadable bank data) raises ``BankUnavailable``: an image is never let through
unchecked because the banks could not be read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis

from worker.banks.base import (
    BankInfo,
    BankMatch,
    BankStore,
    check_bank_name,
    parse_hashes,
    unknown_bank,
)
from worker.config import BankSettings
from worker.errors import BankUnavailable, ConfigError
from worker.hashing.pdq import HASH_BITS, PDQ_MAX_DISTANCE, parse_pdq
from worker.hashing.pdq_index import CHUNKS, probes
from worker.redisclient import redis_client

__all__ = ["DEFAULT_TIMEOUT_S", "RedisBankStore", "bank_client"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1.0
_RECORD = HASH_BITS // 8  # bytes per hash
_ADD_BATCH = 1_000_000  # hashes grouped by index key in one pass: one APPEND per key
_PIPELINE_COMMANDS = 2_000  # commands per round trip while writing
_MEMBERS_PER_COMMAND = 10_000  # hashes per SMISMEMBER / SADD
_U1, _U2, _U4, _U56 = (np.uint64(n) for n in (1, 2, 4, 56))
_M1, _M2, _M4, _H01 = (
    np.uint64(m)
    for m in (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101)
)


def bank_client(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A pooled client that returns bytes (index records are raw) and gives up quickly."""
    return redis_client(url, timeout_s, decode_responses=False)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each 64-bit word (SWAR: a few vector operations, any numpy version)."""
    words = words - ((words >> _U1) & _M1)
    words = (words & _M2) + ((words >> _U2) & _M2)
    words = (words + (words >> _U4)) & _M4
    return (words * _H01) >> _U56


def _closest(records: list[Any], query: np.ndarray) -> tuple[int, bytes] | None:
    """The nearest record to ``query`` (four 64-bit words) and its distance; ties go to the
    lowest record."""
    data = b"".join(r for r in records if r)
    if not data:
        return None
    if len(data) % _RECORD:
        raise BankUnavailable(f"a bank index entry is corrupt ({len(data)} bytes of records)")
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, _RECORD // 8)
    distances = _popcount(words ^ query).sum(axis=1)
    nearest = int(distances.min())
    rows = np.flatnonzero(distances == nearest)
    return nearest, min(data[i * _RECORD : (i + 1) * _RECORD] for i in rows.tolist())


class RedisBankStore(BankStore):
    def __init__(
        self,
        client: redis.Redis | str,
        prefix: str = "modq",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``client``: a URL (the store then owns and closes its client) or a shared client
        created with ``decode_responses=False`` (``bank_client`` makes one)."""
        if not prefix:
            raise ConfigError("the hash banks need a non-empty Redis key prefix")
        self._owns_client = isinstance(client, str)
        self.client = bank_client(client, timeout_s) if isinstance(client, str) else client
        if self.client.get_encoder().decode_responses:
            raise ConfigError(
                "the hash banks read raw bytes: give RedisBankStore a client made with "
                "decode_responses=False (worker.banks.redis.bank_client)"
            )
        self._clock = clock
        self._space = f"{prefix}:v1:bank"
        self._registry = f"{self._space}:registry"
        self._probed: tuple[str, ...] = ()  # the banks enabled at the last match

    @classmethod
    def from_settings(
        cls, banks: BankSettings, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> RedisBankStore:
        """The banks at MODQ_BANK_URL (default: the verdict cache's Redis), MODQ_CACHE_PREFIX."""
        if not banks.url:
            raise ConfigError(
                "MODQ_BANK_URL and MODQ_CACHE_URL are both empty: no Redis for the hash banks"
            )
        return cls(banks.url, banks.prefix, timeout_s=timeout_s)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def _call(self, what: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except (redis.RedisError, OSError) as exc:
            raise BankUnavailable(f"hash banks (redis) {what} failed: {exc}") from exc

    # -- keys ----------------------------------------------------------------------------------

    def _hashes_key(self, name: str) -> str:
        return f"{self._space}:{name}:hashes"

    def _chunk_key(self, name: str, index: int, chunk: int) -> str:
        return f"{self._space}:{name}:mih:{index}:{chunk:04x}"

    def _registry_entries(self, raw: dict[Any, Any]) -> dict[str, dict[str, Any]]:
        entries = {}
        for key, value in raw.items():
            name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            try:
                info = json.loads(value)
                entries[name] = {
                    "created": float(info["created"]),
                    "source": str(info["source"]),
                    "enabled": bool(info["enabled"]),
                }
            except (ValueError, TypeError, KeyError) as exc:
                raise BankUnavailable(f"bank {name!r} has an unreadable registry entry") from exc
        return entries

    # -- the store -----------------------------------------------------------------------------

    def add(self, name: str, hashes: Sequence[str], source: str) -> int:
        check_bank_name(name)
        values = list(dict.fromkeys(parse_hashes(hashes)))
        data = b"".join(value.to_bytes(_RECORD, "big") for value in values)
        rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
        added = 0
        for start in range(0, len(rows), _ADD_BATCH):
            batch = rows[start : start + _ADD_BATCH]
            added += self._call("add", partial(self._add_batch, name, batch))
        info = json.dumps({"created": self._clock(), "source": source, "enabled": True})
        self._call("add", lambda: self.client.hsetnx(self._registry, name, info))
        return added

    def _add_batch(self, name: str, rows: np.ndarray) -> int:
        key = self._hashes_key(name)
        members = [row.tobytes() for row in rows]
        present = self._commands(
            [
                ("smismember", key, members[i : i + _MEMBERS_PER_COMMAND])
                for i in range(0, len(members), _MEMBERS_PER_COMMAND)
            ]
        )
        is_new = ~np.array([bool(flag) for reply in present for flag in reply], dtype=bool)
        new_rows = np.ascontiguousarray(rows[is_new])
        if not len(new_rows):
            return 0
        self._commands(self._index_appends(name, new_rows))
        new = [m for m, fresh in zip(members, is_new.tolist(), strict=True) if fresh]
        counts = self._commands(
            [
                ("sadd", key, *new[i : i + _MEMBERS_PER_COMMAND])
                for i in range(0, len(new), _MEMBERS_PER_COMMAND)
            ]
        )
        return int(sum(counts))

    def _index_appends(self, name: str, rows: np.ndarray) -> list[tuple[Any, ...]]:
        """One APPEND per index key: each chunk's rows sorted and grouped by chunk value, so a
        load sends one command per key rather than one per hash and chunk."""
        chunks = rows.view(">u2")  # (hashes, 16) big-endian 16-bit chunks
        commands: list[tuple[Any, ...]] = []
        for index in range(CHUNKS):
            order = np.argsort(chunks[:, index], kind="stable")
            values = chunks[order, index]
            cuts = (np.flatnonzero(np.diff(values)) + 1).tolist()
            for start, end in zip([0, *cuts], [*cuts, len(order)], strict=True):
                records = rows[order[start:end]].tobytes()
                commands.append(
                    ("append", self._chunk_key(name, index, int(values[start])), records)
                )
        return commands

    def _commands(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run commands in order, ``_PIPELINE_COMMANDS`` per round trip."""
        replies: list[Any] = []
        for start in range(0, len(commands), _PIPELINE_COMMANDS):
            with self.client.pipeline(transaction=False) as pipe:
                for command, *args in commands[start : start + _PIPELINE_COMMANDS]:
                    getattr(pipe, command)(*args)
                replies.extend(pipe.execute())
        return replies

    def banks(self) -> list[BankInfo]:
        def read() -> tuple[dict[str, dict[str, Any]], list[int]]:
            entries = self._registry_entries(self.client.hgetall(self._registry))
            names = sorted(entries)
            counts = self._commands([("scard", self._hashes_key(n)) for n in names])
            return entries, counts

        entries, counts = self._call("banks", read)
        return [
            BankInfo(name, e["enabled"], int(count), e["created"], e["source"])
            for (name, e), count in zip(sorted(entries.items()), counts, strict=True)
        ]

    def set_enabled(self, name: str, enabled: bool) -> None:
        def switch(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(self._registry, name)
            if raw is None:
                raise unknown_bank(name)
            entry = self._registry_entries({name.encode(): raw})[name]
            pipe.multi()
            pipe.hset(self._registry, name, json.dumps({**entry, "enabled": enabled}))

        # WATCH the registry: a concurrent switch or a new bank's entry is never overwritten.
        self._call("set_enabled", lambda: self.client.transaction(switch, self._registry))

    def match(self, hex_hash: str, max_distance: int = PDQ_MAX_DISTANCE) -> BankMatch | None:
        value = parse_pdq(hex_hash)
        suffixes = [f"{i}:{chunk:04x}" for i, chunk in probes(value, max_distance)]
        guess = self._probed
        replies = self._call("match", lambda: self._probe(guess, suffixes, registry=True))
        entries = self._registry_entries(replies[0])
        enabled = tuple(sorted(n for n, e in entries.items() if e["enabled"]))
        found = dict(zip(guess, replies[1:], strict=True))
        missing = tuple(n for n in enabled if n not in found)
        if missing:
            more = self._call("match", lambda: self._probe(missing, suffixes, registry=False))
            found.update(zip(missing, more, strict=True))
        self._probed = enabled
        query = np.frombuffer(value.to_bytes(_RECORD, "big"), dtype=np.uint64)
        best: tuple[int, str, bytes] | None = None
        for name in enabled:
            hit = _closest(found[name], query)
            # Banks go by name, so a later bank wins only when strictly closer.
            if hit is not None and hit[0] <= max_distance and (best is None or hit[0] < best[0]):
                best = (hit[0], name, hit[1])
        return None if best is None else BankMatch(best[1], best[0], best[2].hex())

    def _probe(self, names: Sequence[str], suffixes: list[str], registry: bool) -> list[Any]:
        with self.client.pipeline(transaction=False) as pipe:
            if registry:
                pipe.hgetall(self._registry)
            for name in names:
                pipe.mget([f"{self._space}:{name}:mih:{suffix}" for suffix in suffixes])
            return list(pipe.execute())
