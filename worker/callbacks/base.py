"""The publisher seam, its in-memory fake, and the router that picks a publisher by scheme.

A callback URI comes from an untrusted request, so each publisher parses it strictly: a name
is checked against a small character set and unknown options are refused rather than ignored
(a typo such as ``?quene=`` must not silently route a result to the default queue).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from worker.errors import InvalidCallback, ModqError
from worker.messages import CALLBACK_SCHEMES, ModerationResult

__all__ = [
    "CallbackRouter",
    "LazyPublisher",
    "MemoryPublisher",
    "Publisher",
    "RefusingPublisher",
    "parse_target",
]

MAX_NAME_LENGTH = 256
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/-")


class Publisher(Protocol):
    def publish(self, uri: str, result: ModerationResult) -> None:
        """Deliver ``result`` to ``uri``. Raises ``CallbackFailed`` when a later retry may
        succeed and ``InvalidCallback`` when no retry ever will: a bad URI, a receiver that
        refused, or a scheme this worker is not configured for (the message says which)."""


def parse_target(
    uri: str, scheme: str, options: Collection[str] = ()
) -> tuple[str, dict[str, str]]:
    """The name a ``scheme://name?option=value`` URI targets, and its options.

    The name is everything between ``://`` and ``?``, percent-decoded, so dotted Celery task
    names and ``:``- or ``/``-separated stream keys both arrive exactly as written."""
    parts = urlsplit(uri)
    if parts.scheme != scheme:
        raise InvalidCallback(f"expected a {scheme}:// callback, got {parts.scheme or 'no'}://")
    if parts.fragment:
        raise InvalidCallback(f"{scheme}:// callbacks take no #fragment")
    name = unquote(parts.netloc + parts.path).rstrip("/")
    if not name or len(name) > MAX_NAME_LENGTH or not set(name) <= _NAME_CHARS:
        raise InvalidCallback(
            f"{scheme}:// needs a name of 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 _ . : / -"
        )
    return name, _options(parts.query, scheme, options)


def _options(query: str, scheme: str, allowed: Collection[str]) -> dict[str, str]:
    pairs = parse_qsl(query, keep_blank_values=True)
    found: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidCallback(f"{scheme}:// does not take ?{key}= (options: {known})")
        if key in found:
            raise InvalidCallback(f"{scheme}:// takes ?{key}= once")
        found[key] = value
    return found


class MemoryPublisher:
    """Records every delivery; the fake for unit tests and the embedded ``scan`` mode.

    ``fail_next`` queues errors raised by the next publishes, to exercise retry paths."""

    def __init__(self) -> None:
        self.published: list[tuple[str, ModerationResult]] = []
        self._failures: list[ModqError] = []
        self._lock = threading.Lock()

    def fail_next(self, *errors: ModqError) -> None:
        with self._lock:
            self._failures.extend(errors)

    def publish(self, uri: str, result: ModerationResult) -> None:
        with self._lock:
            if self._failures:
                raise self._failures.pop(0)
            self.published.append((uri, result))


class RefusingPublisher:
    """Stands in for a publisher this worker cannot offer, and says why on every call."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def publish(self, uri: str, result: ModerationResult) -> None:
        raise InvalidCallback(self.reason)


class LazyPublisher:
    """Builds its publisher on first use, so a worker whose requests never name a scheme
    never opens a connection for it (nor fails to start when that backend is down)."""

    def __init__(self, factory: Callable[[], Publisher]) -> None:
        self._factory = factory
        self._publisher: Publisher | None = None
        self._lock = threading.Lock()

    def publish(self, uri: str, result: ModerationResult) -> None:
        self._get().publish(uri, result)

    def _get(self) -> Publisher:
        with self._lock:
            if self._publisher is None:
                self._publisher = self._factory()
            return self._publisher


class CallbackRouter:
    """A ``Publisher`` that hands each URI to the publisher of its scheme."""

    def __init__(
        self,
        *,
        celery: Publisher | None = None,
        redis_stream: Publisher | None = None,
        webhook: Publisher | None = None,
    ) -> None:
        self.publishers: dict[str, Publisher] = {}
        for scheme, publisher in (("celery", celery), ("redis-stream", redis_stream)):
            if publisher is not None:
                self.publishers[scheme] = publisher
        if webhook is not None:
            self.publishers["https"] = webhook

    def publish(self, uri: str, result: ModerationResult) -> None:
        scheme = urlsplit(uri).scheme
        publisher = self.publishers.get(scheme)
        if publisher is None:
            raise InvalidCallback(self._unsupported(scheme))
        publisher.publish(uri, result)

    @staticmethod
    def _unsupported(scheme: str) -> str:
        if scheme == "http":
            return "plain http:// webhooks are refused: results are delivered over https:// only"
        if scheme in CALLBACK_SCHEMES:
            return f"{scheme}:// callbacks are not enabled in this worker"
        allowed = ", ".join(s + "://" for s in CALLBACK_SCHEMES)
        return f"callback scheme {scheme or '(none)'!r} is not supported; use one of {allowed}"
