"""The embedding sink: records, shards, the tap's ordering around quarantine, and the pipeline
streaming one embedding per model run (real bundled model)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.images import distinct_images
from worker.actions import Actions, Assessed
from worker.cache import MemoryCache
from worker.config import Settings
from worker.embeddings import EmbeddingRecord, MemorySink, RecordSource, ShardSink, open_sink
from worker.errors import ConfigError, InvalidDataset, StorageUnavailable
from worker.messages import CacheOutcome, Verdict
from worker.models.backend import Backend
from worker.models.factory import create_backend
from worker.pipeline import Pipeline
from worker.policy import Policy, load_policy
from worker.quarantine import LocalQuarantine
from worker.storage import LocalStore, file_ref
from worker.storage.folders import LocalFolder

BLOCK_ALL = Policy("block-all", 0.0, 0.0)


def _record(i: int, dim: int = 8) -> EmbeddingRecord:
    rng = np.random.default_rng(i)
    return EmbeddingRecord(
        request_id=f"r{i}",
        image=f"file:///images/{i}.jpg",
        sha256=f"{i:064x}",
        model="m",
        revision="sha256:1",
        verdict="allow",
        nsfw_score=i / 100,
        vector=rng.normal(size=dim).astype(np.float32),
    )


@pytest.fixture(scope="module")
def backend() -> Backend:
    return create_backend("opennsfw")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(distinct_images(5, seed=3)):
        (images / f"{i}.jpg").write_bytes(data)
    return images


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_round_trip_every_field(tmp_path: Path, fmt: str) -> None:
    sink = ShardSink(LocalFolder(tmp_path / "shards"), fmt, shard_size=3, flush_s=0)
    written = [_record(i) for i in range(7)]
    for record in written:
        sink.write(record)
    assert len(list((tmp_path / "shards").iterdir())) == 2  # two full shards, one record held
    sink.close()
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert len(names) == 3 and all(name.endswith(f".{fmt}") for name in names)
    read = list(RecordSource(str(tmp_path / "shards")))
    assert [r.request_id for r in read] == [r.request_id for r in written]
    for a, b in zip(read, written, strict=True):
        assert a.to_dict() == b.to_dict()


def test_idle_buffer_is_flushed_by_the_timer(tmp_path: Path) -> None:
    sink = ShardSink(LocalFolder(tmp_path), "jsonl", shard_size=100, flush_s=0.05)
    sink.write(_record(1))
    deadline = 50
    while not list(tmp_path.glob("*.jsonl")) and deadline:
        import time

        time.sleep(0.02)
        deadline -= 1
    sink.close()
    assert len(list(RecordSource(str(tmp_path)))) == 1


class _FlakyShards(LocalFolder):
    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.fail = True

    def put(self, name: str, data: bytes) -> None:
        if self.fail:
            raise StorageUnavailable("bucket unreachable")
        super().put(name, data)


def test_a_failed_shard_is_kept_and_written_at_the_next_flush(tmp_path: Path) -> None:
    target = _FlakyShards(tmp_path)
    sink = ShardSink(target, "jsonl", shard_size=2, flush_s=0)
    for i in range(3):
        sink.write(_record(i))  # the full shard fails: nothing raised, nothing lost
    assert not list(tmp_path.glob("*.jsonl"))
    target.fail = False
    sink.close()
    assert sorted(r.request_id for r in RecordSource(str(tmp_path))) == [
        "r0",
        "r1",
        "r2",
    ]


def test_a_bad_sink_uri_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        open_sink(f"file://{tmp_path}?colour=red")
    with pytest.raises(ConfigError, match="format"):
        open_sink(f"file://{tmp_path}?format=csv")
    with pytest.raises(ConfigError):
        open_sink("ftp://host/dir")


def test_a_malformed_shard_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps(_record(1).to_dict()) + "\n{oops\n")
    with pytest.raises(InvalidDataset, match="line 2"):
        list(RecordSource(str(tmp_path)))
    bad = _record(2).to_dict() | {"embedding": [1.0, float("nan")]}
    (tmp_path / "a.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(InvalidDataset, match="finite"):
        list(RecordSource(str(tmp_path)))


def test_every_model_run_streams_one_embedding_and_cache_hits_none(
    backend: Backend, folder: Path
) -> None:
    sink = MemorySink()
    policy = load_policy("default", backend.card)
    store = LocalStore([folder])
    refs = [file_ref(p) for p in sorted(folder.iterdir())]
    with Pipeline(
        backend, store, policy, cache=MemoryCache(), actions=Actions(sink=sink)
    ) as pipeline:
        first = [pipeline.process(ref) for ref in refs]
        again = [pipeline.process(ref) for ref in refs]
    assert all(r.cache and r.cache.outcome is CacheOutcome.MISS for r in first)
    assert all(r.cache and r.cache.outcome is CacheOutcome.EXACT for r in again)
    assert all(r.embedding is None for r in first)  # streamed, not put in results unasked
    assert sorted(r.image for r in sink.records) == sorted(refs)
    direct = backend.predict(
        [
            Image.open(io.BytesIO(Path(p).read_bytes())).convert("RGB")
            for p in sorted(folder.iterdir())[:1]
        ],
        embed=True,
    )[0]
    streamed = next(r for r in sink.records if r.image == refs[0])
    # draft decoding differs from PIL's full decode a little: same image, same direction
    cos = float(streamed.vector @ direct.embedding) / (
        np.linalg.norm(streamed.vector) * np.linalg.norm(direct.embedding)
    )
    assert cos > 0.98
    assert streamed.model == backend.card.id and streamed.revision == backend.card.revision
    by_ref = {r.image: r for r in first}
    assert all(rec.sha256 == by_ref[rec.image].hashes.sha256 for rec in sink.records)


def test_a_moved_image_is_recorded_with_its_quarantine_location(
    backend: Backend, folder: Path, tmp_path: Path
) -> None:
    sink = MemorySink()
    store = LocalStore([folder, tmp_path / "q"])
    quarantine = LocalQuarantine(tmp_path / "q", store)
    ref = file_ref(sorted(folder.iterdir())[0])
    actions = Actions(quarantine=quarantine, sink=sink)
    with Pipeline(backend, store, BLOCK_ALL, actions=actions) as p:
        assessed = p.assess(ref, "req-1")  # queue mode: stored first, acted on after
        assert assessed.result.verdict is Verdict.BLOCK and assessed.embedding is not None
        assert sink.records == []  # assessing has no side effect
        acted = p.actions.act(assessed)
    assert acted.action is not None and acted.action.kind == "quarantine_move"
    [record] = sink.records
    assert record.image == ref and record.location == acted.action.location
    assert Path(acted.action.location.removeprefix("file://")).exists()


class _BrokenQuarantine(LocalQuarantine):
    def apply(self, ref: str, sha256: str, record: dict[str, object]) -> str:
        raise StorageUnavailable("the quarantine folder is away")


def test_a_failed_move_is_recorded_once_without_a_location(backend: Backend, folder: Path) -> None:
    """The record is written after the quarantine attempt whatever it did; the delivery
    that later finishes the move has no vector and writes no second record."""
    sink = MemorySink()
    store = LocalStore([folder])
    actions = Actions(quarantine=_BrokenQuarantine(folder / "q", store), sink=sink)
    with Pipeline(backend, store, BLOCK_ALL, actions=actions) as p:
        assessed = p.assess(file_ref(sorted(folder.iterdir())[0]), "req-2")
        with pytest.raises(StorageUnavailable):
            p.actions.act(assessed)
        actions.quarantine = LocalQuarantine(folder / "q", store)
        finished = actions.act(Assessed(assessed.result))  # a takeover: the stored result
    assert finished.action is not None and finished.action.kind == "quarantine_move"
    assert len(sink.records) == 1 and sink.records[0].location is None


def test_scan_report_lines_are_records(backend: Backend, folder: Path, tmp_path: Path) -> None:
    from worker.scan import run_scan

    report = tmp_path / "report.jsonl"
    run_scan(
        Settings(cache_dir=tmp_path / "cache", cache_url=None), [folder], report, None, embed=True
    )
    (folder / "broken.jpg").write_bytes(b"not an image")
    run_scan(
        Settings(cache_dir=tmp_path / "cache", cache_url=None),
        [folder],
        tmp_path / "r2.jsonl",
        None,
    )
    source = RecordSource(str(report))
    records = list(source)
    assert len(records) == 5 and source.skipped == 0
    assert {r.vector.size for r in records} == {backend.card.embedding_dim}
    second = RecordSource(str(tmp_path / "r2.jsonl"))
    assert list(second) == [] and second.skipped == 6  # no --embed, and one error line
