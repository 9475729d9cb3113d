"""Deliver a result as a signed HTTPS POST: ``https://hooks.example.com/moderation``.

The body is the result as compact JSON, exactly the bytes that were signed. Each attempt
carries::

    Content-Type: application/json
    X-Modq-Request-Id: <request id>       Idempotency-Key: <delivery id>
    X-Modq-Timestamp: <unix seconds>      X-Modq-Signature: sha256=<hex>

The signature is HMAC-SHA256, keyed with ``MODQ_WEBHOOK_SECRET``, over ``timestamp + "." +
body``. Signing the timestamp (as Stripe and Slack do) lets a receiver refuse a captured
delivery replayed later; deliveries are at-least-once, so receivers dedupe on the request id.
Verify against the raw body, before parsing it::

    import hashlib, hmac, time

    def verify(secret: bytes, body: bytes, timestamp: str, signature: str) -> bool:
        signed = timestamp.encode() + b"." + body
        expected = "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, signature) and abs(time.time() - int(timestamp)) < 300

The same delivery also carries the Standard Webhooks headers (https://www.standardwebhooks.com),
so off-the-shelf verifiers (the ``standardwebhooks`` libraries, Svix's) check it as is::

    webhook-id: <delivery id>             webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(key, id + "." + timestamp + "." + body)>

The delivery id is the request id for the request's stored result, the same on every retry
and re-delivery, so receivers dedupe on it. An answer that is not the stored result (an
``invalid_request`` for a message that failed validation, a last-resort ``internal``) only
claims that request id, so it gets ``<request id>:<code>:<12 hex of sha256(body)>``
instead, and can never make a receiver drop the real verdict as a duplicate.
The key: a secret written ``whsec_<base64>`` (the Standard Webhooks form) is the bytes it
encodes; any other secret is its UTF-8 bytes (hand a verifier ``whsec_`` + their base64, or
the raw bytes). Both signatures use the same key.

Refusals, all permanent: no secret (an unsigned webhook cannot be told from a forgery),
plain ``http://``, a host that resolves to a non-public address (the URL comes from an
untrusted request; operators widen this with ``MODQ_HTTP_ALLOWED_NETWORKS``), any 3xx
(redirects are not followed: name the final URL) and any 4xx but 408, 425 and 429.

SSRF: the host is resolved and checked by the ``NetworkGuard`` and the connection goes to
the checked address, while the Host header, SNI and certificate check keep the hostname
(httpcore uses the ``sni_hostname`` request extension as ``server_hostname``, which the
default SSL context verifies the certificate against). Connections are not kept alive: a
pool keyed by address could otherwise reuse one hostname's verified connection for another.
Proxy variables are ignored (a proxy would resolve the name itself, past the guard); the CA
bundle is certifi's unless ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` names a private one.

Each attempt has one deadline (``timeout_s``, cut to what is left of the publish budget) for
connect, TLS handshake, sending the result and the receiver's status line and headers: every
socket operation gets only the time left (``worker.storage.deadline``), so a receiver that
drips its answer a byte at a time cannot hold the worker past it.

Connection errors, timeouts, 408, 425, 429 and 5xx are retried in-process with exponential
backoff and jitter, honouring ``Retry-After``, within a budget per publish call; after that
``CallbackFailed`` hands the retry to the task, which finally dead-letters the result.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from worker.callbacks.base import delivery_id
from worker.errors import (
    CallbackFailed,
    ForbiddenReference,
    InvalidCallback,
    StorageUnavailable,
)
from worker.log import get_logger
from worker.messages import ModerationResult
from worker.storage.deadline import DeadlineTransport, within
from worker.storage.netguard import NetworkGuard

__all__ = ["WebhookPublisher", "sign", "sign_standard", "signing_key", "verify_signature"]

SIGNATURE_TOLERANCE_S = 300
USER_AGENT = "modq-webhook/1"
_RETRY_STATUSES = frozenset({408, 425, 429})

log = get_logger(__name__)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Modq-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


STANDARD_SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key of ``MODQ_WEBHOOK_SECRET``: a ``whsec_<base64>`` secret is the bytes it
    encodes (the Standard Webhooks form), any other its UTF-8 bytes."""
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        return secret.encode()
    encoded = secret[len(STANDARD_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise InvalidCallback("MODQ_WEBHOOK_SECRET starts with whsec_ but is not base64") from exc
    if not key:
        raise InvalidCallback("MODQ_WEBHOOK_SECRET is an empty whsec_ secret")
    return key


def sign_standard(key: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` value (Standard Webhooks, scheme ``v1``)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify_signature(
    secret: bytes,
    body: bytes,
    timestamp: str,
    signature: str,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """For receivers written in Python: the check of the module docstring."""
    if not hmac.compare_digest(sign(secret, timestamp, body), signature):
        return False
    current = time.time() if now is None else now
    return abs(current - int(timestamp)) < tolerance_s


@dataclass(frozen=True)
class _Retry:
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # IDNA-encoded hostname or bare IP literal: resolved, and the SNI name
    port: int
    host_header: str

    @classmethod
    def parse(cls, uri: str) -> _Target:
        try:
            url = httpx.URL(uri)
        except httpx.InvalidURL as exc:
            raise InvalidCallback(f"webhook URL is not valid: {exc}") from exc
        if url.scheme != "https":
            raise InvalidCallback("webhooks are delivered over https:// only")
        if not url.raw_host:
            raise InvalidCallback("webhook URL names no host")
        if url.userinfo:
            raise InvalidCallback("webhook URLs may not carry credentials; the signature is auth")
        if url.port is not None and not 0 < url.port < 65536:
            raise InvalidCallback(f"webhook URL port {url.port} is out of range")
        host = url.raw_host.decode("ascii")
        return cls(url.copy_with(fragment=None), host, url.port or 443, url.netloc.decode("ascii"))

    def at(self, address: str) -> httpx.URL:
        return self.url.copy_with(host=address)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _classify(response: httpx.Response, origin: str) -> _Retry | None:
    status = response.status_code
    if 200 <= status < 300:
        return None
    if status in _RETRY_STATUSES or status >= 500:
        return _Retry(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
    if 300 <= status < 400:
        raise InvalidCallback(f"{origin} answered {status}; redirects are not followed")
    raise InvalidCallback(f"{origin} refused the result: HTTP {status}")


def _drop_location(response: httpx.Response) -> None:
    """Redirects are refused, never followed: without this, httpx would still parse a 3xx's
    Location and fail the send, as a retryable transport error, on one it cannot parse."""
    response.headers.pop("Location", None)


class WebhookPublisher:
    """``retries`` attempts follow the first; waits grow from ``backoff_s`` (doubling, with
    jitter) and one publish call, attempts included, stays within ``max_total_s``."""

    def __init__(
        self,
        guard: NetworkGuard,
        secret: str | None,
        *,
        retries: int = 5,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        backoff_s: float = 0.5,
        max_total_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.guard = guard
        self._secret = signing_key(secret) if secret else None
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_total_s = max_total_s
        self._sleep = sleep
        # The CA bundle is certifi's unless SSL_CERT_FILE / SSL_CERT_DIR name a private one.
        context = verify or httpx.create_ssl_context()
        self._client = httpx.Client(
            transport=transport or DeadlineTransport(context),
            trust_env=False,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            event_hooks={"response": [_drop_location]},
        )

    def close(self) -> None:
        self._client.close()

    def publish(self, uri: str, result: ModerationResult) -> None:
        if self._secret is None:
            raise InvalidCallback(
                "webhook callbacks are disabled: this worker has no signing secret "
                "(the operator sets MODQ_WEBHOOK_SECRET)"
            )
        target = _Target.parse(uri)
        body = result.model_dump_json().encode()
        delivery = delivery_id(result, body)
        deadline = time.monotonic() + self.max_total_s
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            retry = self._attempt(
                target, body, result.request_id, delivery, self._secret, remaining
            )
            if retry is None:
                log.debug("webhook_delivered", host=target.host, attempts=attempt + 1)
                return
            delay = self._delay(attempt, retry)
            if attempt == self.retries or time.monotonic() + delay >= deadline:
                raise CallbackFailed(
                    f"request {result.request_id}: webhook {target.host} not delivered "
                    f"after {attempt + 1} attempts: {retry.reason}"
                )
            log.warning("webhook_retry", host=target.host, attempt=attempt + 1, reason=retry.reason)
            self._sleep(delay)

    def _delay(self, attempt: int, retry: _Retry) -> float:
        backoff = self.backoff_s * 2.0**attempt
        backoff = backoff / 2 + random.uniform(0, backoff / 2)
        return max(backoff, retry.retry_after or 0.0)

    def _attempt(
        self,
        target: _Target,
        body: bytes,
        request_id: str,
        delivery: str,
        secret: bytes,
        remaining: float,
    ) -> _Retry | None:
        """One POST: ``None`` when delivered, a ``_Retry`` when another attempt may help."""
        try:
            address = self.guard.resolve(target.host, target.port)
        except ForbiddenReference as exc:
            raise InvalidCallback(f"webhook host refused: {exc}") from exc
        except StorageUnavailable as exc:
            return _Retry(str(exc))
        budget = max(0.001, min(self.timeout_s, remaining))
        request = self._client.build_request(
            "POST",
            target.at(address),
            content=body,
            headers=self._headers(target, body, request_id, delivery, secret),
            timeout=budget,
            extensions={"sni_hostname": target.host},
        )
        deadline = time.monotonic() + budget
        try:
            with within(deadline):
                response = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            return _Retry(f"no answer within {budget:.3g} s ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return _Retry(f"{type(exc).__name__}: {exc}")
        response.close()  # the receiver's body is not read: its status says all
        return _classify(response, target.host)

    @staticmethod
    def _headers(
        target: _Target, body: bytes, request_id: str, delivery: str, secret: bytes
    ) -> dict[str, str]:
        """``delivery`` (``webhook-id``, ``Idempotency-Key``) is the request id for a stored
        result and a derived id for an answer that is not one (``delivery_id``)."""
        timestamp = str(int(time.time()))
        return {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "X-Modq-Request-Id": request_id,
            "Idempotency-Key": delivery,
            "X-Modq-Timestamp": timestamp,
            "X-Modq-Signature": sign(secret, timestamp, body),
            "webhook-id": delivery,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign_standard(secret, delivery, timestamp, body),
        }
