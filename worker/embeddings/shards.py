"""Embedding shards: JSONL or Parquet files in a local folder or under an S3 prefix.

A shard is written whole under a name no other writer uses (host, process, start time and a
sequence number), so concurrent workers never collide and a reader never sees half a file:
local shards are written to a hidden temporary name and renamed, S3 objects appear whole.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from worker.embeddings.record import EmbeddingRecord
from worker.errors import ConfigError, InvalidDataset, MissingExtra

__all__ = [
    "FORMATS",
    "LocalShards",
    "S3Shards",
    "ShardTarget",
    "decode_shard",
    "encode_shard",
    "shard_format",
]

FORMATS = ("jsonl", "parquet")


class ShardTarget(Protocol):
    def put(self, name: str, data: bytes) -> None: ...

    def names(self) -> list[str]:
        """Every shard's name, in name order."""
        ...

    def get(self, name: str) -> bytes: ...


def shard_format(name: str) -> str | None:
    suffix = name.rsplit(".", 1)[-1].lower()
    return suffix if suffix in FORMATS else None


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError as exc:
        raise MissingExtra("Parquet shards need pyarrow: pip install 'modq[analysis]'") from exc
    return pa, pq


def encode_shard(records: Sequence[EmbeddingRecord], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r.to_dict()) + "\n" for r in records).encode()
    if fmt != "parquet":
        raise ConfigError(f"embedding shard format {fmt!r}: use one of {', '.join(FORMATS)}")
    pa, pq = _pyarrow()
    rows = [r.to_dict() for r in records]
    columns = {name: [row[name] for row in rows] for name in rows[0] if name != "embedding"}
    table = pa.table(
        {
            **columns,
            "embedding": pa.array([r.vector for r in records], type=pa.list_(pa.float32())),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def decode_shard(data: bytes, fmt: str, name: str) -> Iterator[dict[str, Any]]:
    """The rows of one shard (or scan report) as dicts."""
    if fmt == "parquet":
        _, pq = _pyarrow()
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises its own error tree for a bad file
            raise InvalidDataset(f"{name}: not a Parquet file: {exc}") from exc
        yield from table.to_pylist()
        return
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidDataset(f"{name} line {number}: not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise InvalidDataset(f"{name} line {number}: expected a JSON object")
        yield row


class LocalShards:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{name}.tmp"
        with staging.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.folder / name)

    def names(self) -> list[str]:
        if self.folder.is_file():
            return [self.folder.name]
        return sorted(
            str(p.relative_to(self.folder))
            for p in self.folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and shard_format(p.name)
        )

    def get(self, name: str) -> bytes:
        path = self.folder if self.folder.is_file() else self.folder / name
        return path.read_bytes()


class S3Shards:
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    def put(self, name: str, data: bytes) -> None:
        from worker.storage.s3 import s3_errors, s3_ref

        key = self.prefix + name
        with s3_errors(s3_ref(self.bucket, key)):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def names(self) -> list[str]:
        from worker.storage.s3 import s3_errors, s3_ref

        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        with s3_errors(s3_ref(self.bucket, self.prefix)):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = str(item["Key"])[len(self.prefix) :]
                    if shard_format(name):
                        names.append(name)
        return sorted(names)

    def get(self, name: str) -> bytes:
        from worker.storage.s3 import s3_errors, s3_ref

        key = self.prefix + name
        with s3_errors(s3_ref(self.bucket, key)):
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
