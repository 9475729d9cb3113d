"""A vector index of embeddings: cosine similarity over HNSW (faiss), saved as a folder.

    INDEX/index.json      model id and revision, dimension, count, how it was built
    INDEX/vectors.faiss   the HNSW graph and the unit-length vectors (float32)
    INDEX/items.jsonl     one line per indexed image: key, sha256, reference, verdict, score,
                          the request ids that carried it, where a quarantine move put it

One vector per distinct image (sha256): re-deliveries and re-uploads of the same bytes share a
key and list every request id. Every vector must come from one model (id and revision): a
similarity between two models' embeddings means nothing, so mixing them is refused.

Why faiss (faiss-cpu): Meta's library is the reference of the field, a self-contained wheel
that needs only NumPy, with HNSW, inner-product search (cosine on unit vectors) and a file
format that reloads in milliseconds. usearch was the first choice (smaller), but its 2.26
wheel crashes the process when imported before onnxruntime, which every modq process loads.
Exact search (``exact=True``) is brute force over the same stored vectors: the recall check
compares the graph against it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.embeddings.record import EmbeddingRecord
from worker.errors import InvalidDataset, MissingExtra

__all__ = ["IndexedImage", "Neighbour", "VectorIndex"]

META = "index.json"
VECTORS = "vectors.faiss"
ITEMS = "items.jsonl"
FORMAT_VERSION = 1


@dataclass
class IndexedImage:
    key: int
    sha256: str
    image: str
    verdict: str
    nsfw_score: float
    request_ids: list[str] = field(default_factory=list)
    location: str | None = None

    @property
    def where(self) -> str:
        """Where the image is now: its quarantine location after a move, else its reference."""
        return self.location or self.image


@dataclass(frozen=True)
class Neighbour:
    item: IndexedImage
    similarity: float  # cosine, 1.0 for the same direction


def _faiss() -> Any:
    try:
        import faiss
    except ModuleNotFoundError as exc:
        raise MissingExtra("vector indexes need faiss-cpu: pip install 'modq[analysis]'") from exc
    return faiss


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


class VectorIndex:
    def __init__(self, meta: dict[str, Any], items: list[IndexedImage], index: Any) -> None:
        self.meta = meta
        self.items = items
        self.index = index
        self._by_request = {rid: item for item in items for rid in item.request_ids}
        self._by_sha = {item.sha256: item for item in items}

    @property
    def model(self) -> str:
        return f"{self.meta['model']}@{self.meta['revision']}"

    @classmethod
    def build(
        cls, records: Iterable[EmbeddingRecord], connectivity: int = 32, expansion: int = 128
    ) -> VectorIndex:
        """``connectivity`` is HNSW's M (links per node), ``expansion`` its efConstruction;
        searches use ``efSearch = max(64, expansion // 2)``."""
        items: list[IndexedImage] = []
        by_sha: dict[str, IndexedImage] = {}
        vectors: list[np.ndarray] = []
        first: EmbeddingRecord | None = None
        for record in records:
            first = first or record
            _check_same_model(first, record)
            known = by_sha.get(record.sha256)
            if known is not None:
                if record.request_id not in known.request_ids:
                    known.request_ids.append(record.request_id)
                known.location = record.location or known.location
                continue
            item = IndexedImage(
                len(items),
                record.sha256,
                record.image,
                record.verdict,
                record.nsfw_score,
                [record.request_id],
                record.location,
            )
            by_sha[record.sha256] = item
            items.append(item)
            vectors.append(record.vector)
        if first is None:
            raise InvalidDataset("no embeddings to index: scan with --embed or set a sink")
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(first.vector.size, connectivity, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = expansion
        index.add(_unit(np.stack(vectors)))
        meta = {
            "format": FORMAT_VERSION,
            "model": first.model,
            "revision": first.revision,
            "dim": int(first.vector.size),
            "count": len(items),
            "metric": "cosine",
            "connectivity": connectivity,
            "expansion": expansion,
            "ef_search": max(64, expansion // 2),
            "created": time.time(),
        }
        return cls(meta, items, index)

    def save(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(out / VECTORS))
        with (out / ITEMS).open("w") as handle:
            for item in self.items:
                handle.write(json.dumps(asdict(item)) + "\n")
        (out / META).write_text(json.dumps(self.meta, indent=2) + "\n")  # last: marks it whole
        return out

    @classmethod
    def open(cls, path: Path) -> VectorIndex:
        if not (path / META).is_file():
            raise InvalidDataset(f"{path} is not a modq index (no {META}); build one first")
        meta = json.loads((path / META).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise InvalidDataset(f"{path}: index format {meta.get('format')}, expected 1")
        with (path / ITEMS).open() as handle:
            items = [IndexedImage(**json.loads(line)) for line in handle if line.strip()]
        index = _faiss().read_index(str(path / VECTORS))
        if index.ntotal != len(items):
            raise InvalidDataset(f"{path}: {VECTORS} does not match {ITEMS}; rebuild the index")
        return cls(meta, items, index)

    def __len__(self) -> int:
        return len(self.items)

    def find(self, request_id_or_sha256: str) -> IndexedImage | None:
        return self._by_request.get(request_id_or_sha256) or self._by_sha.get(request_id_or_sha256)

    def vector(self, item: IndexedImage) -> np.ndarray:
        """The item's stored (unit-length) embedding."""
        return np.asarray(self.index.reconstruct(item.key), dtype=np.float32)

    def vectors(self, items: list[IndexedImage]) -> np.ndarray:
        keys = np.array([item.key for item in items], dtype=np.int64)
        return np.asarray(self.index.reconstruct_batch(keys), dtype=np.float32)

    def search(self, vector: np.ndarray, k: int = 10, exact: bool = False) -> list[Neighbour]:
        """The ``k`` nearest images by cosine similarity, nearest first."""
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.meta["dim"]:
            raise InvalidDataset(
                f"a {query.shape[1]}-dimensional query against a {self.meta['dim']}-dimensional "
                "index"
            )
        keys, similarities = self._search(query, min(k, len(self.items)), exact)
        return [
            Neighbour(self.items[int(key)], float(sim))
            for key, sim in zip(keys[0], similarities[0], strict=True)
            if key >= 0
        ]

    def search_many(self, queries: np.ndarray, k: int, exact: bool = False) -> np.ndarray:
        """Keys of the ``k`` nearest items of each query row: shape (queries, k)."""
        return self._search(np.atleast_2d(queries), k, exact)[0]

    def _search(self, queries: np.ndarray, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        queries = _unit(queries)
        if exact:
            stored = self.index.reconstruct_n(0, self.index.ntotal)
            similarities = queries @ stored.T
            keys = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
            return keys, np.take_along_axis(similarities, keys, axis=1)
        self.index.hnsw.efSearch = max(int(self.meta.get("ef_search", 64)), k)
        similarities, keys = self.index.search(queries, k)
        return keys, similarities


def _check_same_model(first: EmbeddingRecord, record: EmbeddingRecord) -> None:
    if (record.model, record.revision) != (first.model, first.revision):
        raise InvalidDataset(
            f"{record.image}: embedded by {record.model}@{record.revision}, but the index holds "
            f"{first.model}@{first.revision}; build one index per model"
        )
    if record.vector.size != first.vector.size:
        raise InvalidDataset(
            f"{record.image}: a {record.vector.size}-dimensional embedding among "
            f"{first.vector.size}-dimensional ones"
        )
