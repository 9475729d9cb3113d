"""The publisher seam, its in-memory fake, and the router that picks a publisher by scheme.

A callback URI comes from an untrusted request, so each publisher parses it strictly: a name
is checked against a small character set and unknown options are refused rather than ignored
(a typo such as ``?quene=`` must not silently route a result to the default queue).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Collection, Iterator
from contextvars import ContextVar
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from worker.errors import InvalidCallback, ModqError
from worker.messages import CALLBACK_SCHEMES, ModerationResult

__all__ = [
    "KOMBU_KEYS",
    "CallbackRouter",
    "LazyPublisher",
    "MemoryPublisher",
    "Publisher",
    "RefusingPublisher",
    "ReservedNames",
    "answer_id",
    "check_name",
    "delivery_id",
    "parse_target",
]

MAX_NAME_LENGTH = 256
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/-")


#: keys kombu's Redis transport keeps for itself, on the broker (``unacked*``: messages
#: handed out and not yet acked; ``_kombu.binding.*``: routing tables)
KOMBU_KEYS = frozenset({"unacked", "unacked_index", "unacked_mutex"})
KOMBU_PREFIXES = ("_kombu.",)
#: kombu's separator of a queue's priority sub-queues (``modq\x06\x163``)
KOMBU_PRIORITY_SEP = "\x06\x16"


class ReservedNames:
    """Names a callback may not write to: one check for every publisher, because a Celery
    queue and a Redis stream are both keys on a Redis that modq or kombu already use.

    Always reserved: kombu's own keys (``unacked``, ``unacked_index``, ``unacked_mutex``,
    ``_kombu.*``) and any name holding kombu's priority separator. ``queues`` (modq's request
    and dead-letter queues) are reserved with their priority sub-queues; ``prefixes`` (modq's
    ``{cache_prefix}:``) reserve every key under them."""

    def __init__(self, queues: Collection[str] = (), prefixes: Collection[str] = ()) -> None:
        self.queues = frozenset(q for q in queues if q)
        self.prefixes = tuple(p for p in prefixes if p)

    def why(self, name: str) -> str | None:
        """Why ``name`` is reserved, or ``None`` when a callback may use it."""
        if name in self.queues:
            return "it is one of modq's own queues"
        if KOMBU_PRIORITY_SEP in name:
            return "it is a priority sub-queue of kombu's Redis transport"
        if name in KOMBU_KEYS or name.startswith(KOMBU_PREFIXES):
            return "it is a key of kombu's Redis transport"
        if name.startswith(self.prefixes):
            return "it is under modq's own key prefix"
        return None

    def check(self, name: str, what: str) -> None:
        """Raise ``InvalidCallback`` when ``what`` (``celery://t?queue=``, ``redis-stream://``)
        names a reserved ``name``: nothing may then be handed to a broker."""
        reason = self.why(name)
        if reason is not None:
            raise InvalidCallback(f"{what} cannot target {name!r}: {reason}")


def check_name(name: str, what: str) -> str:
    """``name`` when it is 1-256 characters from the callback name set, else ``InvalidCallback``."""
    if not name or len(name) > MAX_NAME_LENGTH or not set(name) <= _NAME_CHARS:
        raise InvalidCallback(
            f"{what} needs a name of 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 _ . : / -"
        )
    return name


_unstored: ContextVar[bool] = ContextVar("modq_unstored_answer", default=False)


@contextlib.contextmanager
def answer_id() -> Iterator[None]:
    """Publications inside are answers that are not the request's stored result (a message
    that failed validation, a last resort): they must not claim the request id as their
    delivery id, or a receiver deduping on it would drop the real verdict coming later."""
    token = _unstored.set(True)
    try:
        yield
    finally:
        _unstored.reset(token)


def delivery_id(result: ModerationResult, body: bytes) -> str:
    """The id a receiver dedupes on (``webhook-id``, ``Idempotency-Key``): the request id for
    a stored result; inside ``answer_id()``, ``<request_id>:<code>:<12 hex of sha256(body)>``."""
    if not _unstored.get():
        return result.request_id
    code = result.error.code if result.error is not None else "answer"
    return f"{result.request_id}:{code}:{hashlib.sha256(body).hexdigest()[:12]}"


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
    name = check_name(unquote(parts.netloc + parts.path).rstrip("/"), f"{scheme}://")
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


def check_uri(publisher: object, uri: str) -> None:
    """``publisher.check(uri)`` where it has one (``InvalidCallback`` for a URI no result can
    ever reach); publishers without one refuse only when they publish."""
    check = getattr(publisher, "check", None)
    if check is not None:
        check(uri)


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

    def check(self, uri: str) -> None:
        """Nothing is refused before the work: the result is dead-lettered for replay."""


class LazyPublisher:
    """Builds its publisher on first use, so a worker whose requests never name a scheme
    never opens a connection for it (nor fails to start when that backend is down)."""

    def __init__(self, factory: Callable[[], Publisher]) -> None:
        self._factory = factory
        self._publisher: Publisher | None = None
        self._lock = threading.Lock()

    def publish(self, uri: str, result: ModerationResult) -> None:
        self._get().publish(uri, result)

    def check(self, uri: str) -> None:
        check_uri(self._get(), uri)

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
        self._publisher(uri).publish(uri, result)

    def check(self, uri: str) -> None:
        """``InvalidCallback`` when ``uri`` could never be delivered to, whatever the
        result: a reserved name or a malformed target. Checked before any work."""
        publisher = self.publishers.get(urlsplit(uri).scheme)
        if publisher is not None:
            check_uri(publisher, uri)

    def _publisher(self, uri: str) -> Publisher:
        scheme = urlsplit(uri).scheme
        publisher = self.publishers.get(scheme)
        if publisher is None:
            raise InvalidCallback(self._unsupported(scheme))
        return publisher

    @staticmethod
    def _unsupported(scheme: str) -> str:
        if scheme == "http":
            return "plain http:// webhooks are refused: results are delivered over https:// only"
        if scheme in CALLBACK_SCHEMES:
            return f"{scheme}:// callbacks are not enabled in this worker"
        allowed = ", ".join(s + "://" for s in CALLBACK_SCHEMES)
        return f"callback scheme {scheme or '(none)'!r} is not supported; use one of {allowed}"
