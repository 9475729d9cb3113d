"""Turn the dataset into model inputs and, for head mode, embeddings.

Files are read, hashed, decoded and preprocessed on a thread pool (Pillow releases the GIL)
one chunk ahead of the forward pass, exactly as the model's authors preprocess (the
backend's own ``preprocess``), so a head trained here sees what ``modq scan`` will feed it.
The embedding is the pre-logits tensor of the same forward pass that scores an image.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from worker.decode import DecodeLimits, decode
from worker.errors import ImageTooLarge, InvalidDataset, ModelConfigError, ModqError
from worker.finetune.data import Dataset, Sample, Skipped
from worker.finetune.embed_cache import EmbeddingCache
from worker.models.backend import Backend
from worker.models.preprocess import draft_size

__all__ = ["Extraction", "ReadOptions", "extract_embeddings", "preprocess_dataset"]

Advance = Callable[[int], None]


@dataclass(frozen=True)
class ReadOptions:
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    exact_decode: bool = False
    batch_size: int = 32
    workers: int = 0  # 0: one per core
    max_unreadable: int = 100  # more skipped images than this: the dataset is refused


@dataclass
class Extraction:
    """Per kept image, in dataset order: an embedding (head) or preprocessed pixels (full)."""

    arrays: np.ndarray
    labels: np.ndarray
    samples: list[Sample]
    skipped: list[Skipped]
    from_cache: int = 0
    seconds: float = 0.0


@dataclass
class _Prepared:
    sample: Sample
    digest: str = ""
    pixels: np.ndarray | None = None  # None when cached or skipped
    skipped: Skipped | None = None


def _prepare(
    backend: Backend, sample: Sample, options: ReadOptions, cached: frozenset[str]
) -> _Prepared:
    prepared = _Prepared(sample)
    try:
        size = sample.path.stat().st_size
        if size > options.limits.max_bytes:
            raise ImageTooLarge(f"{size} bytes; the limit is {options.limits.max_bytes}")
        data = sample.path.read_bytes()
        prepared.digest = hashlib.sha256(data).hexdigest()
        if prepared.digest in cached:
            return prepared
        draft = None if options.exact_decode else draft_size(backend.card)
        image = decode(data, options.limits, draft).frames[0]
        prepared.pixels = backend.preprocess(image)
    except ModqError as exc:
        prepared.skipped = Skipped(sample.path, exc.code, str(exc))
    except OSError as exc:
        prepared.skipped = Skipped(sample.path, "unreadable", str(exc.strerror or exc))
    return prepared


def _chunks(
    backend: Backend,
    samples: Sequence[Sample],
    options: ReadOptions,
    cached: frozenset[str] = frozenset(),
) -> Iterator[list[_Prepared]]:
    """Chunks of ``batch_size`` prepared samples; the next chunk is prepared while the caller
    works on the current one, so at most two chunks of pixels are held at once."""
    size = options.batch_size
    with ThreadPoolExecutor(options.workers or os.cpu_count() or 1) as pool:

        def submit(start: int) -> list[Future[_Prepared]]:
            return [
                pool.submit(_prepare, backend, s, options, cached)
                for s in samples[start : start + size]
            ]

        pending = submit(0)
        for start in range(0, len(samples), size):
            following = submit(start + size)
            yield [future.result() for future in pending]
            pending = following


class _Collector:
    """Keeps the kept images in order and refuses the dataset past ``max_unreadable``."""

    def __init__(self, options: ReadOptions, advance: Advance | None) -> None:
        self.options = options
        self.advance = advance
        self.arrays: list[np.ndarray] = []
        self.samples: list[Sample] = []
        self.skipped: list[Skipped] = []

    def skip(self, skipped: Skipped) -> None:
        self.skipped.append(skipped)
        if len(self.skipped) > self.options.max_unreadable:
            listed = "; ".join(f"{s.path.name}: [{s.code}] {s.message}" for s in self.skipped[:3])
            raise InvalidDataset(
                f"{len(self.skipped)} images could not be read, more than the "
                f"{self.options.max_unreadable} allowed (--max-unreadable); first: {listed}"
            )

    def keep(self, sample: Sample, array: np.ndarray) -> None:
        self.samples.append(sample)
        self.arrays.append(array)

    def done(self, count: int) -> None:
        if self.advance is not None:
            self.advance(count)

    def result(self, started: float, from_cache: int = 0) -> Extraction:
        if not self.arrays:
            raise InvalidDataset("no image in the dataset could be read")
        labels = np.array([s.label for s in self.samples], dtype=np.int64)
        elapsed = time.perf_counter() - started
        arrays = np.stack(self.arrays)
        return Extraction(arrays, labels, self.samples, self.skipped, from_cache, elapsed)


def preprocess_dataset(
    backend: Backend, dataset: Dataset, options: ReadOptions, advance: Advance | None = None
) -> Extraction:
    """Every readable image as the model's input array (full mode trains on these)."""
    started = time.perf_counter()
    collector = _Collector(options, advance)
    for chunk in _chunks(backend, dataset.samples, options):
        for item in chunk:
            if item.skipped is not None:
                collector.skip(item.skipped)
            elif item.pixels is not None:
                collector.keep(item.sample, item.pixels)
        collector.done(len(chunk))
    return collector.result(started)


def extract_embeddings(
    backend: Backend,
    dataset: Dataset,
    options: ReadOptions,
    cache: EmbeddingCache | None = None,
    advance: Advance | None = None,
) -> Extraction:
    """Every readable image's pre-logits embedding, from the cache where it holds one."""
    started = time.perf_counter()
    namespace = _namespace(backend, options)
    cached = frozenset(cache.digests(namespace)) if cache is not None else frozenset()
    collector = _Collector(options, advance)
    from_cache = 0
    for chunk in _chunks(backend, dataset.samples, options, cached):
        fresh = [(item, item.pixels) for item in chunk if item.pixels is not None]
        vectors: dict[str, np.ndarray] = {}
        if fresh:
            output = backend.forward(np.stack([pixels for _, pixels in fresh]), embed=True)
            if output.embeddings is None:
                raise ModelConfigError(
                    f"{backend.card.id} exposes no pre-logits embedding to train a head on"
                )
            rows = zip(fresh, output.embeddings, strict=True)
            vectors = {item.digest: row for (item, _), row in rows}
            if cache is not None:
                cache.put_many(namespace, vectors.items())
        hits = [i.digest for i in chunk if i.skipped is None and i.pixels is None]
        if hits and cache is not None:
            vectors.update(cache.get_many(namespace, hits))
            from_cache += len(hits)
        for item in chunk:
            if item.skipped is not None:
                collector.skip(item.skipped)
            else:
                collector.keep(item.sample, vectors[item.digest])
        collector.done(len(chunk))
    return collector.result(started, from_cache)


def _namespace(backend: Backend, options: ReadOptions) -> str:
    decode_mode = "exact" if options.exact_decode else "draft"
    return f"{backend.card.cache_namespace}/{decode_mode}"
