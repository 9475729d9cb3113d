"""Folders of whole objects modq writes itself (embedding shards, heatmaps): a local
directory or an S3 prefix, with the same three verbs.

An object appears whole or not at all: local files are written under a hidden temporary
name, synced and renamed; S3 objects are whole by nature. Names are relative to the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError

__all__ = ["LocalFolder", "ObjectFolder", "S3Folder", "open_folder"]


class ObjectFolder(Protocol):
    def put(self, name: str, data: bytes) -> str:
        """Write ``data`` under ``name``; returns the object's reference."""
        ...

    def names(self) -> list[str]:
        """Every object's name, in name order."""
        ...

    def get(self, name: str) -> bytes: ...


def open_folder(uri: str, endpoint_url: str | None = None) -> LocalFolder | S3Folder:
    """``file:///dir``, a bare path, or ``s3://bucket/prefix/`` (query options ignored)."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        from worker.storage.s3 import create_s3_client

        client = create_s3_client(endpoint_url)
        return S3Folder(client, parts.netloc, unquote(parts.path).lstrip("/"))
    if parts.scheme == "file":
        return LocalFolder(Path(unquote(parts.path)))
    if parts.scheme == "":
        return LocalFolder(Path(uri.split("?", 1)[0]))
    raise ConfigError(f"{uri}: use file:///dir or s3://bucket/prefix/")


class LocalFolder:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, name: str, data: bytes) -> str:
        from worker.storage.base import file_ref

        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp")
        with staging.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
        return file_ref(target)

    def names(self) -> list[str]:
        if self.folder.is_file():
            return [self.folder.name]
        return sorted(
            str(p.relative_to(self.folder))
            for p in self.folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def get(self, name: str) -> bytes:
        path = self.folder if self.folder.is_file() else self.folder / name
        return path.read_bytes()


class S3Folder:
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    def put(self, name: str, data: bytes) -> str:
        from worker.storage.s3 import s3_errors, s3_ref

        key = self.prefix + name
        ref = s3_ref(self.bucket, key)
        with s3_errors(ref):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return ref

    def names(self) -> list[str]:
        from worker.storage.s3 import s3_errors, s3_ref

        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        with s3_errors(s3_ref(self.bucket, self.prefix)):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                names.extend(
                    str(item["Key"])[len(self.prefix) :] for item in page.get("Contents", [])
                )
        return sorted(names)

    def get(self, name: str) -> bytes:
        from worker.storage.s3 import s3_errors, s3_ref

        key = self.prefix + name
        with s3_errors(s3_ref(self.bucket, key)):
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
