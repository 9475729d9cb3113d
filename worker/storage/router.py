"""One store for every reference: dispatch by URL scheme to the store that owns it.

The pipeline reads through a single ``ObjectStore``; which schemes a deployment accepts, and
under what limits (roots, buckets, networks), is decided once here from the storage and
HTTP settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from worker.config import HttpSettings, StorageSettings
from worker.errors import InvalidReference
from worker.storage.base import ObjectStore
from worker.storage.http import HttpStore
from worker.storage.local import LocalStore
from worker.storage.netguard import NetworkGuard
from worker.storage.s3 import S3Store

__all__ = ["RoutingStore", "build_store"]


class RoutingStore:
    def __init__(self, stores: Mapping[str, ObjectStore]) -> None:
        self.stores = {scheme.lower(): store for scheme, store in stores.items()}

    def store_for(self, ref: str) -> ObjectStore:
        scheme, sep, _ = ref.partition("://")
        store = self.stores.get(scheme.lower()) if sep else None
        if store is None:
            accepted = ", ".join(f"{name}://" for name in sorted(self.stores))
            raise InvalidReference(f"{ref!r}: unsupported reference; accepted: {accepted}")
        return store

    def read(self, ref: str, max_bytes: int) -> bytes:
        return self.store_for(ref).read(ref, max_bytes)


def build_store(storage: StorageSettings, http_settings: HttpSettings) -> RoutingStore:
    """The store for ``file://``, ``s3://``, ``http://`` and ``https://`` references, each
    confined by the settings (no roots or buckets configured: nothing of that kind is read)."""
    guard = NetworkGuard(http_settings.allowed_networks)
    http = HttpStore(guard, http_settings.timeout_s)
    return RoutingStore(
        {
            "file": LocalStore(Path(root) for root in storage.allowed_roots),
            "s3": S3Store(storage.allowed_buckets, storage.s3_endpoint_url),
            "http": http,
            "https": http,
        }
    )
