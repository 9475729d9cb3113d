"""Quarantine into S3: server-side copies of s3:// sources, uploads of file:// sources."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from worker.config import QuarantineAction
from worker.errors import (
    ConfigError,
    InvalidReference,
    ObjectNotFound,
    SourceChanged,
    StorageUnavailable,
)
from worker.quarantine.base import check_action
from worker.quarantine.local import delete_verified_file
from worker.storage import LocalStore
from worker.storage.local import Located
from worker.storage.s3 import (
    ObjectDigest,
    ObjectHead,
    S3Location,
    S3Store,
    parse_s3_prefix,
    s3_error_code,
    s3_errors,
)

__all__ = ["S3Quarantine"]

MAX_METADATA_BYTES = 2000  # S3 allows 2 KiB of user metadata in all
MAX_TAGS = 10  # S3's limit per object
_TAG_UNSAFE = re.compile(r"[^\w +\-=.:/@]")


class S3Quarantine:
    """Server-side copies into ``s3://bucket/prefix/<sha256[:16]>-<name>``, with the verdict
    in the copy's metadata and the full record beside it in ``<copy>.json``. The destination
    is operator configuration and need not be an allowed source bucket.

    A move deletes the exact version that was verified, for good (a delete marker would leave
    the bytes readable by version id; this needs ``s3:DeleteObjectVersion``); in an
    unversioned bucket the delete is conditional on the ETag that was hashed.
    """

    def __init__(
        self,
        store: S3Store,
        destination_uri: str,
        action: QuarantineAction = "move",
        local: LocalStore | None = None,
    ) -> None:
        check_action(action, ("move", "copy", "tag"), "s3:// sources")
        self.store = store
        self.local = local if action != "tag" else None
        self.bucket, prefix = parse_s3_prefix(destination_uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.action = action

    def target_for(self, source: S3Location, sha256: str) -> S3Location:
        basename = source.key.rsplit("/", 1)[-1] or "object"
        return S3Location(self.bucket, f"{self.prefix}{sha256[:16]}-{basename}")

    def handles(self, ref: str) -> bool:
        return ref.startswith("s3://") or (self.local is not None and ref.startswith("file://"))

    def apply(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
        if ref.startswith("file://") and self.local is not None:
            return self._apply_file(ref, sha256, record)
        source = self.store.locate(ref)
        if self.action == "tag":
            return self._tag(source, sha256, record)
        target = self.target_for(source, sha256)
        if not self._verified(target, sha256):
            with self._moved_meanwhile(target, sha256):
                self._place_copy(source, target, sha256, record)
        self._write_record(target, {**record, "source": ref, "sha256": sha256})
        if self.action == "move":
            self._delete_source(source, sha256)
        return target.ref

    def _apply_file(self, ref: str, sha256: str, record: dict[str, Any]) -> str:
        """A local file into the bucket: upload, read back and verify, record, then delete
        the file only while it still holds the scored bytes."""
        assert self.local is not None
        with self.local.locate(ref) as path:
            return self._apply_located(path, ref, sha256, record)

    def _apply_located(self, path: Located, ref: str, sha256: str, record: dict[str, Any]) -> str:
        target = S3Location(self.bucket, f"{self.prefix}{sha256[:16]}-{path.name}")
        if not self._verified(target, sha256):
            with self._moved_meanwhile(target, sha256):
                self._upload(path, target, sha256, record, ref)
        self._write_record(target, {**record, "source": ref, "sha256": sha256})
        if self.action == "move":
            try:
                delete_verified_file(path, sha256)
            except OSError as exc:
                raise StorageUnavailable(f"cannot delete {ref}: {exc}") from exc
        return target.ref

    def _upload(
        self, path: Located, target: S3Location, sha256: str, record: dict[str, Any], ref: str
    ) -> None:
        try:
            with path.open() as handle:
                data = handle.read()
        except ObjectNotFound as exc:
            raise ObjectNotFound(
                f"{ref} is gone and no verified copy exists in quarantine"
            ) from exc
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {ref}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SourceChanged(f"{ref} changed since it was scored; left in place")
        metadata = _metadata(
            record, sha256, ref, ObjectHead(size=len(data), etag="", version_id=None)
        )
        with self._destination_errors(), s3_errors(target.ref):
            self.store.client.put_object(
                Bucket=target.bucket, Key=target.key, Body=data, Metadata=metadata
            )
        if not self._verified(target, sha256):
            raise StorageUnavailable(f"the copy of {ref} at {target.ref} did not verify")

    @contextmanager
    def _moved_meanwhile(self, target: S3Location, sha256: str) -> Iterator[None]:
        """A source that vanished while copying may have been moved by a concurrent
        delivery of the same request: with its verified copy in place, the move is done."""
        try:
            yield
        except ObjectNotFound:
            if not self._verified(target, sha256):
                raise

    def _verified(self, target: S3Location, sha256: str) -> bool:
        try:
            return self.store.digest(target).sha256 == sha256
        except ObjectNotFound:
            return False

    def _place_copy(
        self, source: S3Location, target: S3Location, sha256: str, record: dict[str, Any]
    ) -> None:
        try:
            head = self.store.head(source)
        except ObjectNotFound as exc:
            raise ObjectNotFound(
                f"{source.ref} is gone and no verified copy exists in quarantine"
            ) from exc
        # Pinned to the version and ETag just seen, so the copy is of one known object.
        pinned = S3Location(source.bucket, source.key, head.version_id or source.version_id)
        with self._destination_errors(), s3_errors(source.ref):
            copied = self.store.client.copy_object(
                CopySource=pinned.object_args(),
                CopySourceIfMatch=head.etag,
                Bucket=target.bucket,
                Key=target.key,
                MetadataDirective="REPLACE",
                Metadata=_metadata(record, sha256, pinned.ref, head),
                ContentType=head.content_type or "application/octet-stream",
            )
        copy = self.store.digest(
            S3Location(target.bucket, target.key, copied.get("VersionId") or None)
        )
        if copy.size != head.size or copy.sha256 != sha256:
            self._discard(copy.location)
            raise SourceChanged(f"{source.ref} changed since it was scored; left in place")

    @contextmanager
    def _destination_errors(self) -> Iterator[None]:
        try:
            yield
        except ObjectNotFound as exc:
            # The source was just seen, so a missing bucket is the destination.
            if s3_error_code(exc) == "NoSuchBucket":
                raise ConfigError(f"quarantine bucket {self.bucket!r} does not exist") from exc
            raise

    def _discard(self, location: S3Location) -> None:
        with s3_errors(location.ref):
            self.store.client.delete_object(**location.object_args())

    def _write_record(self, target: S3Location, record: dict[str, Any]) -> None:
        sidecar = S3Location(target.bucket, target.key + ".json")
        body = json.dumps(
            {**record, "action": self.action, "location": target.ref},
            indent=2,
            sort_keys=True,
            default=str,
        )
        with s3_errors(sidecar.ref):
            self.store.client.put_object(
                Bucket=sidecar.bucket,
                Key=sidecar.key,
                Body=body.encode(),
                ContentType="application/json",
            )

    def _delete_source(self, source: S3Location, sha256: str) -> None:
        try:
            current = self.store.digest(source)
        except ObjectNotFound:
            return  # an earlier run already finished the move
        if current.sha256 != sha256:
            # A new upload took the key; the scored bytes are safe in quarantine.
            raise SourceChanged(f"{source.ref} now holds other bytes; not deleted")
        self._delete_exact(current)

    def _delete_exact(self, current: ObjectDigest) -> None:
        """Delete the very object that was hashed: its version (gone for good, not hidden
        behind a delete marker) or, unversioned, only while its ETag is unchanged."""
        location, client = current.location, self.store.client
        if location.version_id is not None:
            with s3_errors(location.ref):
                client.delete_object(**location.object_args())
            return
        try:
            with s3_errors(location.ref):
                client.delete_object(**location.object_args(), IfMatch=current.etag)
        except StorageUnavailable as exc:
            if s3_error_code(exc) != "NotImplemented":
                raise
            # A store without conditional deletes: the check above is as close as it gets.
            with s3_errors(location.ref):
                client.delete_object(**location.object_args())
        except SourceChanged as exc:
            raise SourceChanged(f"{location.ref} was replaced just now; not deleted") from exc

    def _tag(self, source: S3Location, sha256: str, record: dict[str, Any]) -> str:
        current = self.store.digest(source)
        if current.sha256 != sha256:
            raise SourceChanged(f"{source.ref} now holds other bytes; not tagged")
        pinned, client = current.location, self.store.client
        with s3_errors(pinned.ref):
            existing = client.get_object_tagging(**pinned.object_args())["TagSet"]
            tags = _merge_tags(existing, _tags(record), pinned.ref)
            client.put_object_tagging(**pinned.object_args(), Tagging={"TagSet": tags})
        return pinned.ref


def _ascii(value: object, limit: int = 128) -> str:
    """S3 metadata and tags take short printable ASCII."""
    if value is None:
        return ""
    return "".join(char if " " <= char <= "~" else "?" for char in str(value))[:limit]


def _score(record: dict[str, Any]) -> str:
    score = record.get("nsfw_score")
    return f"{score:.6f}" if isinstance(score, float | int) else _ascii(score)


def _model_id(record: dict[str, Any]) -> str:
    model = record.get("model")
    if isinstance(model, dict):
        revision = model.get("revision")
        return _ascii(f"{model.get('id')}@{revision}" if revision else model.get("id"))
    return _ascii(model)


def _metadata(
    record: dict[str, Any], sha256: str, source_ref: str, head: ObjectHead
) -> dict[str, str]:
    ours = {
        "modq-verdict": _ascii(record.get("verdict")),
        "modq-nsfw-score": _score(record),
        "modq-request-id": _ascii(record.get("request_id")),
        "modq-model": _model_id(record),
        "modq-sha256": sha256,
        "modq-source-etag": _ascii(head.etag),
    }
    if len(source_ref) <= 512 and source_ref.isascii():
        ours["modq-source"] = source_ref
    ours = {key: value for key, value in ours.items() if value}
    # The source's own metadata travels too, unless together they would pass S3's limit.
    merged = {**head.metadata, **ours}
    return merged if _metadata_bytes(merged) <= MAX_METADATA_BYTES else ours


def _metadata_bytes(metadata: dict[str, str]) -> int:
    return sum(len(key.encode()) + len(value.encode()) for key, value in metadata.items())


def _tags(record: dict[str, Any]) -> list[tuple[str, str]]:
    """modq's tags, most important first: if the object has little room, the verdict wins."""
    values = [
        ("modq-verdict", "block"),
        ("modq-score", _score(record)),
        ("modq-request", str(record.get("request_id", ""))),
    ]
    return [(key, _TAG_UNSAFE.sub("_", value)[:256]) for key, value in values]


def _merge_tags(
    existing: list[dict[str, str]], ours: list[tuple[str, str]], ref: str
) -> list[dict[str, str]]:
    names = {key for key, _ in ours}
    merged = [tag for tag in existing if tag["Key"] not in names]
    room = MAX_TAGS - len(merged)
    if room < 1:
        raise InvalidReference(f"{ref} already has {len(merged)} tags; no room for modq-verdict")
    return merged + [{"Key": key, "Value": value} for key, value in ours[:room]]
