"""Where image bytes come from (and quarantined images go)."""

from worker.storage.base import ObjectStore, file_ref, ref_to_path
from worker.storage.local import LocalStore
from worker.storage.memory import MemoryStore

__all__ = ["LocalStore", "MemoryStore", "ObjectStore", "file_ref", "ref_to_path"]
