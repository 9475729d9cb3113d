"""The shared verdict cache in Redis: an exact tier by sha256, a perceptual tier by
multi-index hashing (``worker.hashing.phash_index``).

Every key lives under one prefix; nothing else is read, written or scanned::

    {prefix}:v1:{namespace}:sha:{sha256}            entry JSON, expires after ttl_s
    {prefix}:v1:{namespace}:mih{k}:{i}:{chunk}      set of the sha256s whose pHash chunk i is chunk

``k`` is the chunk count (radius + 1), so caches built for different radii never mix layouts.
A set's TTL is refreshed by every put into it, so it outlives its newest member by at most
``ttl_s``; members whose entry has expired are skipped by ``near`` and removed then. ``near``
is one round trip (a script reads the sets and their members' entries) unless the sets hold
more candidates than one MGET slice; then the entries are read in slices by a second. Keys read
unambiguously from the right: a sha256 is 64 hex digits and a chunk is hex, so any namespace
(``/`` and ``:`` included) is safe, except ``result`` and ``result:…``, which would reach into
the result store's keys.

A dead Redis must neither stop classification nor slow it down: every failure raises
``CacheUnavailable`` (the pipeline then classifies without the cache), sockets give up in a
fraction of a second, and after a failure a circuit breaker fails fast, without touching the
network, for a couple of seconds before it lets one call probe again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import redis

from worker.cache.base import CachedEntry, NearMatch, check_radius, indexable_phash, rank_near
from worker.config import CacheSettings
from worker.errors import CacheUnavailable, ConfigError
from worker.hashing.phash_index import DEFAULT_RADIUS, layout_for, parse_hash, probes
from worker.log import get_logger
from worker.redisclient import DEFAULT_BREAKER_S, DEFAULT_TIMEOUT_S, CircuitBreaker, redis_client

__all__ = ["RedisCache"]

log = get_logger(__name__)

T = TypeVar("T")

DEFAULT_MAX_CANDIDATES = 10_000
_MGET_BATCH = 500
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESULT_SPACE = "result"  # worker.cache.results keys: {prefix}:v1:result:{request_id}

# KEYS: the probed sets (at most MAX_PROBES, well inside Lua's stack); ARGV: the entry keys'
# prefix, and the most members whose entries are read here (one MGET slice, so the script
# holds Redis no longer than one MGET of the slicing path does). Answers {members} when there
# are more, else {members, entries}, an entry false where its member is no sha256 or expired.
# The entry keys are built here, not declared: like SUNION over the sets, that needs one Redis
# (not a Cluster), which is what the cache runs on.
_NEAR = """
local members = redis.call('SUNION', unpack(KEYS))
if #members > tonumber(ARGV[2]) then
    return {members}
end
local entries = {}
for i, member in ipairs(members) do
    entries[i] = false
    if #member == 64 and not member:find('[^0-9a-f]') then
        entries[i] = redis.call('GET', ARGV[1] .. member)
    end
end
return {members, entries}
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_sha256(sha256: str) -> None:
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")


def _decode_entry(text: object) -> CachedEntry | None:
    """An entry, or None for one this version cannot read (treated as a miss)."""
    try:
        return CachedEntry.from_json(_text(text))
    except (ValueError, TypeError) as exc:
        log.warning("unreadable verdict cache entry; ignoring it", error=str(exc))
        return None


class RedisCache:
    def __init__(
        self,
        client: redis.Redis | str,
        prefix: str,
        ttl_s: int,
        *,
        radius: int = DEFAULT_RADIUS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        breaker_s: float = DEFAULT_BREAKER_S,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``client``: a URL (the cache then owns and closes its client) or a shared client.
        ``max_candidates`` bounds the work of one ``near`` on a pathological index."""
        if not prefix or ttl_s < 1:
            raise ValueError("the Redis cache needs a non-empty prefix and a TTL of 1 s or more")
        self.layout = layout_for(radius)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_candidates = max_candidates
        self._owns_client = isinstance(client, str)
        self.client = redis_client(client, timeout_s) if isinstance(client, str) else client
        self.breaker = CircuitBreaker("verdict cache (redis)", breaker_s, clock)
        self._near = self.client.register_script(_NEAR)

    @classmethod
    def from_settings(cls, cache: CacheSettings, client: redis.Redis | None = None) -> RedisCache:
        target = client if client is not None else cache.url
        if target is None:
            raise ConfigError("MODQ_CACHE_URL is empty, so there is no Redis verdict cache")
        return cls(target, cache.prefix, cache.ttl_s, radius=cache.perceptual_radius)

    @property
    def radius(self) -> int:
        return self.layout.radius

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    # -- keys ----------------------------------------------------------------------------------

    def _space(self, namespace: str) -> str:
        if not namespace or namespace.split(":", 1)[0] == _RESULT_SPACE:
            raise ValueError(f"unusable cache namespace {namespace!r}")
        return f"{self.prefix}:v1:{namespace}"

    def _chunk_keys(self, space: str, phash: int) -> list[str]:
        """The sets an entry with this pHash belongs to."""
        tag = self.layout.tag
        return [f"{space}:{tag}:{i}:{chunk}" for i, chunk in enumerate(self.layout.chunks(phash))]

    def _probe_keys(self, space: str, phash: int, radius: int) -> list[str]:
        """The sets that hold every entry within ``radius``."""
        tag = self.layout.tag
        return [f"{space}:{tag}:{i}:{chunk}" for i, chunk in probes(self.layout, phash, radius)]

    # -- the cache -----------------------------------------------------------------------------

    def get(self, namespace: str, sha256: str) -> CachedEntry | None:
        _check_sha256(sha256)
        key = f"{self._space(namespace)}:sha:{sha256}"
        text = self.breaker.call("get", lambda: self.client.get(key))
        return None if text is None else _decode_entry(text)

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None:
        _check_sha256(sha256)
        space = self._space(namespace)
        value = indexable_phash(entry)
        chunk_keys = [] if value is None else self._chunk_keys(space, value)

        def write() -> None:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(f"{space}:sha:{sha256}", entry.to_json(), ex=self.ttl_s)
                for key in chunk_keys:
                    pipe.sadd(key, sha256)
                    pipe.expire(key, self.ttl_s)
                pipe.execute()

        self.breaker.call("put", write)

    def near(
        self, namespace: str, phash: str, dhash: str | None, radius: int, limit: int = 8
    ) -> list[NearMatch]:
        check_radius(radius)
        if dhash is not None:
            parse_hash(dhash)  # reject a bad query before any network call
        space = self._space(namespace)
        chunk_keys = self._probe_keys(space, parse_hash(phash), radius)
        if limit <= 0:
            return []
        entry_prefix = f"{space}:sha:"
        reply = self.breaker.call(
            "near", lambda: self._near(chunk_keys, [entry_prefix, _MGET_BATCH])
        )
        members = [_text(member) for member in reply[0]]
        shas = self._bounded(sorted(m for m in members if _SHA256.fullmatch(m)))
        if len(reply) > 1:
            read = dict(zip(members, reply[1], strict=True))
            texts = [read[sha256] for sha256 in shas]
        else:
            texts = self.breaker.call("near", lambda: self._mget([entry_prefix + s for s in shas]))
        candidates: list[tuple[str, CachedEntry]] = []
        stale: list[str] = []
        for sha256, text in zip(shas, texts, strict=True):
            entry = None if text is None else _decode_entry(text)
            if entry is None:
                stale.append(sha256)
            else:
                candidates.append((sha256, entry))
        if stale:
            self._forget(chunk_keys, stale)
        return rank_near(candidates, phash, dhash, radius, limit)

    def _bounded(self, shas: list[str]) -> list[str]:
        if len(shas) <= self.max_candidates:
            return shas
        log.warning(
            "perceptual candidates capped; some near matches may be missed",
            candidates=len(shas),
            max_candidates=self.max_candidates,
        )
        return shas[: self.max_candidates]

    def _mget(self, keys: Sequence[str]) -> list[object]:
        """MGET in slices (one round trip), so a large candidate set never becomes one huge
        command that blocks Redis for everyone else."""
        if not keys:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(keys), _MGET_BATCH):
                pipe.mget(keys[start : start + _MGET_BATCH])
            replies: Iterable[list[object]] = pipe.execute()
        return [value for reply in replies for value in reply]

    def _forget(self, chunk_keys: Sequence[str], stale: Sequence[str]) -> None:
        """Drop members whose entry has expired. Best effort: the sets expire anyway. A put
        of the same sha256 racing this can lose a membership until that image is put again;
        only a perceptual hit is lost, never an exact one."""

        def remove() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                for key in chunk_keys:
                    pipe.srem(key, *stale)
                pipe.execute()

        try:
            self.breaker.call("near cleanup", remove)
        except CacheUnavailable as exc:
            log.warning("could not drop expired perceptual index members", error=str(exc))
