"""``s3://`` references: read objects from allowed buckets of S3 or an S3-compatible store.

References are URLs: ``s3://bucket/key`` or ``s3://bucket/key?versionId=…`` for one exact
object version. The key is everything after the first ``/`` up to the first ``?``;
percent-escapes in it are decoded, and anything else is taken as written, so both
``s3://b/a%20b/%C3%BC.jpg`` and ``s3://b/a b/ü.jpg`` name the key ``a b/ü.jpg``. A key that
itself holds ``?`` or a ``%`` followed by two hex digits must spell them ``%3F`` and ``%25``;
``#`` is part of the key (S3 has no fragments). Keys with a ``.`` or ``..`` segment are refused
(a path-normalising proxy would resolve them out of the bucket). ``s3_ref`` writes references
in that form, so what ``iter_objects`` yields parses back to the same key, or is refused.

Only buckets the operator allowed are read; an empty allowlist allows none. boto3 is imported
where a client is first needed, so producers that import ``worker.storage`` never load it.
botocore retries little (the Celery task owns retries with backoff); every botocore error is
wrapped into the error tree with the reference in its message.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from worker.errors import (
    ForbiddenReference,
    ImageTooLarge,
    InvalidReference,
    ModqError,
    ObjectNotFound,
    SourceChanged,
    StorageUnavailable,
)

__all__ = [
    "ObjectDigest",
    "ObjectHead",
    "S3Location",
    "S3Store",
    "create_s3_client",
    "parse_s3_prefix",
    "parse_s3_ref",
    "s3_error_code",
    "s3_errors",
    "s3_ref",
]

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 2  # botocore's own tries per call; the task retries with backoff on top
MAX_POOL_CONNECTIONS = 64  # task threads share one client
CHUNK_BYTES = 1 << 16
MAX_KEY_BYTES = 1024

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_KEY_SAFE = "/!$&'()*+,;=:@~"  # left readable by s3_ref; parse_s3_ref reads them literally
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchVersion", "NoSuchBucket", "NotFound", "404"})
_FORBIDDEN = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_TRANSIENT = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
    }
)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str
    version_id: str | None = None

    @property
    def ref(self) -> str:
        return s3_ref(self.bucket, self.key, self.version_id)

    def object_args(self) -> dict[str, str]:
        """Bucket, Key and (when pinned) VersionId, as boto3 object calls take them."""
        args = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id is not None:
            args["VersionId"] = self.version_id
        return args


@dataclass(frozen=True)
class ObjectDigest:
    """What one full read of an object saw: its bytes' sha256, and the exact version read."""

    sha256: str
    size: int
    etag: str
    location: S3Location


@dataclass(frozen=True)
class ObjectHead:
    size: int
    etag: str
    version_id: str | None
    content_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def s3_ref(bucket: str, key: str, version_id: str | None = None) -> str:
    ref = f"s3://{bucket}/{quote(key, safe=_KEY_SAFE)}"
    return f"{ref}?{urlencode({'versionId': version_id})}" if version_id else ref


def _split(ref: str) -> tuple[str, str, str | None]:
    if ref[:5].lower() != "s3://":
        raise InvalidReference(f"not an s3:// reference: {ref!r}")
    bucket, _, rest = ref[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidReference(f"{ref!r}: {bucket!r} is not a bucket name")
    path, has_query, query = rest.partition("?")
    try:
        key = unquote(path, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidReference(f"{ref!r}: the key's percent-escapes are not UTF-8") from exc
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidReference(f"{ref!r}: the key is over {MAX_KEY_BYTES} bytes")
    _refuse_dot_segments(ref, key)
    return bucket, key, _version(ref, query) if has_query else None


def _refuse_dot_segments(ref: str, key: str) -> None:
    # S3 takes "../other/key" literally, but botocore puts the key in the request path, and a
    # proxy or S3-compatible server that normalises paths would resolve "/allowed/../other/key"
    # to a bucket the allowlist never saw. Checked after unescaping: %2E%2E is ".." too.
    if any(segment in (".", "..") for segment in key.split("/")):
        raise InvalidReference(f"{ref!r}: a '.' or '..' segment in the key is not allowed")


def _version(ref: str, query: str) -> str:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        pairs = []
    if len(pairs) != 1 or pairs[0][0] != "versionId" or not pairs[0][1]:
        raise InvalidReference(
            f"{ref!r}: the only query allowed is ?versionId=…; spell a '?' in a key as %3F"
        )
    return pairs[0][1]


def parse_s3_ref(ref: str) -> S3Location:
    """The bucket, key and optional version named by ``ref`` (rules in the module docstring)."""
    bucket, key, version_id = _split(ref)
    if not key:
        raise InvalidReference(f"{ref!r} names a bucket, not an object")
    return S3Location(bucket, key, version_id)


def parse_s3_prefix(uri: str) -> tuple[str, str]:
    """The bucket and key prefix of ``s3://bucket/prefix/`` (the prefix may be empty)."""
    bucket, prefix, version_id = _split(uri)
    if version_id is not None:
        raise InvalidReference(f"{uri!r}: a prefix has no version")
    return bucket, prefix


def create_s3_client(endpoint_url: str | None = None, **session_args: str) -> Any:
    """A boto3 S3 client with short timeouts and few retries; ``session_args`` (region,
    credentials) go to a private ``boto3.Session``, otherwise the default chain applies."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        # MinIO and most S3-compatible stores are addressed by path, not by bucket subdomain.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    session = boto3.session.Session(**session_args)  # sessions are not shared across threads
    return session.client("s3", endpoint_url=endpoint_url, config=config)


@contextmanager
def s3_errors(ref: str) -> Iterator[None]:
    """Wrap botocore and transport errors raised inside the block into the error tree."""
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ModqError:
        raise
    except ClientError as exc:
        raise _client_error(exc, ref) from exc
    except ParamValidationError as exc:
        raise InvalidReference(f"{ref}: {exc}") from exc
    except (BotoCoreError, HTTPError, OSError) as exc:
        raise StorageUnavailable(f"{ref}: S3 is unreachable: {exc}") from exc


def s3_error_code(exc: BaseException) -> str:
    """The S3 error code behind an error that ``s3_errors`` wrapped ('' when there is none)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _client_error(exc: Any, ref: str) -> ModqError:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    message = f"{ref}: S3 answered {code or status}"
    if code in _NOT_FOUND or status in (404, 405):  # 405: the version is a delete marker
        return ObjectNotFound(message)
    if code in _FORBIDDEN or status == 403:
        return ForbiddenReference(message)
    if code == "PreconditionFailed" or status == 412:
        return SourceChanged(f"{message}: the object changed")
    if code in _TRANSIENT or status >= 500 or status == 429:
        return StorageUnavailable(message)
    if 400 <= status < 500:
        return InvalidReference(message)
    return StorageUnavailable(message)


def _real_version(version_id: object) -> str | None:
    # Unversioned and suspended buckets report the version "null"; it pins nothing.
    return None if version_id in (None, "", "null") else str(version_id)


class S3Store:
    def __init__(
        self,
        allowed_buckets: Iterable[str],
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.allowed_buckets = frozenset(allowed_buckets)
        self.endpoint_url = endpoint_url
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 client, created on first use (so a store nobody reads never loads boto3)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = create_s3_client(self.endpoint_url)
        return self._client

    def check_bucket(self, bucket: str, ref: str) -> None:
        if bucket not in self.allowed_buckets:
            raise ForbiddenReference(f"{ref}: bucket {bucket!r} is not in the allowed buckets")

    def locate(self, ref: str) -> S3Location:
        """The location behind ``ref``, refused unless its bucket is allowed."""
        location = parse_s3_ref(ref)
        self.check_bucket(location.bucket, ref)
        return location

    def read(self, ref: str, max_bytes: int) -> bytes:
        location = self.locate(ref)
        with s3_errors(ref):
            response = self.client.get_object(**location.object_args())
            with closing(response["Body"]) as body:
                length = response.get("ContentLength")
                if length is not None and length > max_bytes:
                    raise ImageTooLarge(f"{ref} is {length} bytes, over the {max_bytes} limit")
                return _read_capped(body, max_bytes, ref)

    def head(self, location: S3Location) -> ObjectHead:
        with s3_errors(location.ref):
            response = self.client.head_object(**location.object_args())
        return ObjectHead(
            size=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            version_id=_real_version(response.get("VersionId")),
            content_type=response.get("ContentType"),
            metadata=dict(response.get("Metadata") or {}),
        )

    def digest(self, location: S3Location) -> ObjectDigest:
        """Hash the object's bytes as a stream (any size, bounded memory)."""
        digest = hashlib.sha256()
        size = 0
        with s3_errors(location.ref):
            response = self.client.get_object(**location.object_args())
            with closing(response["Body"]) as body:
                while chunk := body.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
        version_id = _real_version(response.get("VersionId")) or location.version_id
        pinned = S3Location(location.bucket, location.key, version_id)
        return ObjectDigest(digest.hexdigest(), size, str(response["ETag"]), pinned)

    def iter_objects(self, bucket: str, prefix: str = "", page_size: int = 1000) -> Iterator[str]:
        """``s3://`` references of the objects under ``prefix``, one listing page in memory at
        a time; keys ending in ``/`` (folder placeholders) are skipped."""
        where = s3_ref(bucket, prefix)
        self.check_bucket(bucket, where)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        with s3_errors(where):
            for page in pages:
                for item in page.get("Contents", ()):
                    if not item["Key"].endswith("/"):
                        yield s3_ref(bucket, item["Key"])


def _read_capped(body: Any, max_bytes: int, ref: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := body.read(min(CHUNK_BYTES, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLarge(f"{ref} is over the {max_bytes}-byte limit")
    return b"".join(chunks)
