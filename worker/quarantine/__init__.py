"""Quarantine actions: see ``base`` for the rules every one of them keeps."""

from __future__ import annotations

from typing import TypeVar

from worker.config import StorageSettings
from worker.errors import ConfigError, InvalidReference
from worker.quarantine.base import Quarantine
from worker.quarantine.local import LocalQuarantine
from worker.quarantine.s3 import S3Quarantine
from worker.storage import LocalStore, ObjectStore, RoutingStore, ref_to_path
from worker.storage.s3 import S3Store

__all__ = ["LocalQuarantine", "Quarantine", "S3Quarantine", "build_quarantine"]

T = TypeVar("T")


def build_quarantine(storage: StorageSettings, store: ObjectStore) -> Quarantine | None:
    """The quarantine ``MODQ_QUARANTINE_URI`` names (``s3://bucket/prefix/`` or
    ``file:///dir``), acting on sources read through ``store``; ``None`` when unset."""
    uri = storage.quarantine_uri
    if uri is None:
        return None
    scheme = uri.partition("://")[0].lower()
    try:
        if scheme == "s3":
            s3 = _store_of(store, "s3", S3Store)
            local = store.stores.get("file") if isinstance(store, RoutingStore) else None
            return S3Quarantine(
                s3,
                uri,
                storage.quarantine_action,
                local if isinstance(local, LocalStore) else None,
            )
        if scheme == "file":
            local = _store_of(store, "file", LocalStore)
            return LocalQuarantine(ref_to_path(uri), local, storage.quarantine_action)
    except InvalidReference as exc:
        raise ConfigError(f"MODQ_QUARANTINE_URI: {exc}") from exc
    raise ConfigError(f"MODQ_QUARANTINE_URI={uri!r}: use s3://bucket/prefix/ or file:///dir")


def _store_of(store: ObjectStore, scheme: str, kind: type[T]) -> T:
    found = store.stores.get(scheme) if isinstance(store, RoutingStore) else store
    if not isinstance(found, kind):
        raise ConfigError(f"MODQ_QUARANTINE_URI is {scheme}:// but no {scheme}:// store is set up")
    return found
