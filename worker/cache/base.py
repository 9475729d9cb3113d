"""The cache seam, the asymmetric-trust rule for perceptual matches, and the in-memory fake.

Two tiers: an exact match on the sha256 of the bytes, and a near match on the perceptual hash.
A near match is another image, so it may only lend a verdict the model could not make more
severe on this one: block (see ``choose_near_match``).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from worker.hashing.mih import hamming
from worker.hashing.phash_index import HASH_BITS, parse_hash

__all__ = [
    "CachedEntry",
    "MemoryCache",
    "NearMatch",
    "VerdictCache",
    "check_radius",
    "choose_near_match",
    "indexable_phash",
    "rank_near",
]


@dataclass(frozen=True)
class CachedEntry:
    """What a classification leaves behind: per-label probabilities (of the worst frame)
    and the perceptual hashes, so a hit needs no decode at all. Only an ``informative``
    entry (not flat, not tiny) is ever matched perceptually."""

    probabilities: dict[str, float]
    frames: int = 1
    phash: str | None = None
    dhash: str | None = None
    informative: bool = False
    # PDQ, kept so an exact hit is still checked against hash banks without a decode.
    pdq: str | None = None
    pdq_quality: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CachedEntry:
        # Rows written before a field existed lack it (its default applies); fields a newer
        # writer added are ignored, so a rolling upgrade can share one cache.
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class NearMatch:
    sha256: str
    entry: CachedEntry
    phash_distance: int
    dhash_distance: int | None  # None when the candidate or the query has no dHash


class VerdictCache(Protocol):
    """Keyed by (namespace, sha256): the namespace carries model id, revision and the
    preprocessing version, so entries from other weights or preprocessing never match."""

    def get(self, namespace: str, sha256: str) -> CachedEntry | None: ...

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None:
        """Store ``entry``; index its pHash for ``near`` only when it is informative."""

    def near(
        self, namespace: str, phash: str, dhash: str | None, radius: int, limit: int = 8
    ) -> list[NearMatch]:
        """Informative entries within ``radius`` of ``phash`` (full Hamming distance),
        nearest first, at most ``limit``. Any radius is correct; the radius a cache was
        built for is the one it answers with the fewest lookups."""


def indexable_phash(entry: CachedEntry) -> int | None:
    """The pHash to index ``entry`` under, or None when it must never match perceptually."""
    if not entry.informative or entry.phash is None:
        return None
    try:
        return parse_hash(entry.phash)
    except ValueError:
        return None


def check_radius(radius: int) -> None:
    if not 0 <= radius <= HASH_BITS:
        raise ValueError(f"perceptual radius must be in 0..{HASH_BITS}, got {radius}")


def _dhash_distance(query: int | None, candidate: str | None) -> int | None:
    if query is None or candidate is None:
        return None
    try:
        return hamming(query, parse_hash(candidate))
    except ValueError:
        return None


def _nearness(match: NearMatch) -> tuple[int, int, str]:
    dhash = HASH_BITS + 1 if match.dhash_distance is None else match.dhash_distance
    return match.phash_distance, dhash, match.sha256


def rank_near(
    candidates: Iterable[tuple[str, CachedEntry]],
    phash: str,
    dhash: str | None,
    radius: int,
    limit: int,
) -> list[NearMatch]:
    """The full-distance check every cache runs on its candidates: informative entries
    within ``radius``, nearest first (ties by dHash distance, then sha256), at most ``limit``."""
    query = parse_hash(phash)
    query_dhash = None if dhash is None else parse_hash(dhash)
    matches: list[NearMatch] = []
    for sha256, entry in candidates:
        value = indexable_phash(entry)
        if value is None or (distance := hamming(query, value)) > radius:
            continue
        matches.append(
            NearMatch(sha256, entry, distance, _dhash_distance(query_dhash, entry.dhash))
        )
    matches.sort(key=_nearness)
    return matches[: max(limit, 0)]


def choose_near_match(
    matches: Iterable[NearMatch],
    blocks: Callable[[CachedEntry], bool],
    radius: int,
) -> NearMatch | None:
    """The near match whose scores may be reused, or None (classify the image).

    A near match lends its verdict to a different image, so it may only lend one that no model
    run on that image could make more severe: the most severe, block (``blocks`` judges it
    under the request's policy). Anything less is classified, because a near-duplicate of a
    review or allow image can score higher on its own: a pHash distance of a few bits leaves
    room for different content, and pHash collisions can be forged. The nearest blocking match
    wins; reusing it catches a re-upload of known-bad content, and a forged collision with a
    bad image can at worst cost its uploader a block.
    """
    usable = sorted(
        (m for m in matches if m.entry.informative and m.phash_distance <= radius),
        key=_nearness,
    )
    return next((m for m in usable if blocks(m.entry)), None)


class MemoryCache:
    """The fake, with a brute-force ``near``."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, CachedEntry]] = {}
        self._lock = threading.Lock()

    def get(self, namespace: str, sha256: str) -> CachedEntry | None:
        with self._lock:
            return self._entries.get(namespace, {}).get(sha256)

    def put(self, namespace: str, sha256: str, entry: CachedEntry) -> None:
        with self._lock:
            self._entries.setdefault(namespace, {})[sha256] = entry

    def near(
        self, namespace: str, phash: str, dhash: str | None, radius: int, limit: int = 8
    ) -> list[NearMatch]:
        check_radius(radius)
        with self._lock:
            candidates = list(self._entries.get(namespace, {}).items())
        return rank_near(candidates, phash, dhash, radius, limit)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._entries.values())
