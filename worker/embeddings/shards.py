"""Embedding shards: JSONL or Parquet files in a local folder or under an S3 prefix
(``worker.storage.folders``), each written whole under a name no other writer uses (host,
process, start time and a sequence number), so concurrent workers never collide and a reader
never sees half a file."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

from worker.embeddings.record import EmbeddingRecord
from worker.errors import ConfigError, InvalidDataset, MissingExtra

__all__ = ["FORMATS", "decode_shard", "encode_shard", "shard_format"]

FORMATS = ("jsonl", "parquet")


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
    """One shard's bytes. Vectors go out as float32 straight from NumPy (orjson, Arrow):
    formatting 1024 Python floats per record was most of a sink's cost."""
    if fmt == "jsonl":
        import orjson

        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        return b"".join(
            orjson.dumps({**r.fields(), "embedding": r.vector}, option=option) for r in records
        )
    if fmt != "parquet":
        raise ConfigError(f"embedding shard format {fmt!r}: use one of {', '.join(FORMATS)}")
    import numpy as np

    pa, pq = _pyarrow()
    rows = [r.fields() for r in records]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    offsets = np.concatenate([[0], np.cumsum([r.vector.size for r in records])]).astype(np.int32)
    values = pa.array(np.concatenate([r.vector for r in records]).astype(np.float32))
    table = pa.table({**columns, "embedding": pa.ListArray.from_arrays(offsets, values)})
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
