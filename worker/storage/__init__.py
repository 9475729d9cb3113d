"""Where image bytes come from (and quarantined images go).

Importing this package loads neither boto3 nor httpx: each store imports its client library
when it first needs a connection, so producers can use references without those costs.
"""

from worker.storage.base import ObjectStore, file_ref, ref_to_path
from worker.storage.http import HttpStore
from worker.storage.local import LocalStore
from worker.storage.memory import MemoryStore
from worker.storage.netguard import NetworkGuard
from worker.storage.router import RoutingStore, build_store
from worker.storage.s3 import S3Location, S3Store, parse_s3_prefix, parse_s3_ref, s3_ref

__all__ = [
    "HttpStore",
    "LocalStore",
    "MemoryStore",
    "NetworkGuard",
    "ObjectStore",
    "RoutingStore",
    "S3Location",
    "S3Store",
    "build_store",
    "file_ref",
    "parse_s3_prefix",
    "parse_s3_ref",
    "ref_to_path",
    "s3_ref",
]
