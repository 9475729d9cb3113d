"""Vector index, nearest-image search and clusters: real embeddings of the bundled model over a
few hundred images, and the HNSW graph's recall against brute force."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.support.images import distinct_images
from worker.config import Settings
from worker.decode import DecodeLimits
from worker.embeddings import EmbeddingRecord, RecordSource
from worker.errors import InvalidDataset
from worker.scan import run_scan
from worker.similarity import VectorIndex, cluster_index, embed_image, reader_for, write_sheet

QUERIES = 8


def _scene(seed: int, size: int = 320) -> Image.Image:
    """A picture of its own: background waves, shapes and lines placed by ``seed``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    f = rng.uniform(5, 40, 3)
    base = np.stack(
        [
            127 + 120 * np.sin(x / f[0] + y / f[1]),
            127 + 120 * np.cos(y / f[2]),
            255 * rng.random() * x / size,
        ],
        axis=-1,
    )
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
        w, h = (int(v) for v in rng.integers(20, size // 2, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=fill)
    return image


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _variants(image: Image.Image) -> dict[str, bytes]:
    w, h = image.size
    return {
        "resized": _jpeg(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "recompressed": _jpeg(image, quality=35),
        "cropped": _jpeg(image.crop((w // 12, h // 12, w - w // 12, h - h // 12))),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VectorIndex]:
    """~300 images: 8 query scenes with 3 near-duplicates each, 32 other scenes (hard
    negatives: same generator), 240 crops of the example photos; indexed from a real scan."""
    folder = tmp_path_factory.mktemp("corpus")
    for q in range(QUERIES):
        scene = _scene(q)
        (folder / f"q{q}.jpg").write_bytes(_jpeg(scene))
        for name, data in _variants(scene).items():
            (folder / f"q{q}-{name}.jpg").write_bytes(data)
    for s in range(32):
        (folder / f"other{s}.jpg").write_bytes(_jpeg(_scene(1000 + s)))
    for i, data in enumerate(distinct_images(240, seed=5)):
        (folder / f"photo{i}.jpg").write_bytes(data)
    work = tmp_path_factory.mktemp("scan")
    report = work / "report.jsonl"
    run_scan(Settings(cache_dir=work / "cache", cache_url=None), [folder], report, None, embed=True)
    index = VectorIndex.build(RecordSource(str(report)))
    index.save(work / "index")
    return folder, VectorIndex.open(work / "index")


def test_exact_duplicate_first_then_near_duplicates_above_everything_else(
    corpus: tuple[Path, VectorIndex],
) -> None:
    folder, index = corpus
    assert len(index) == QUERIES * 4 + 32 + 240
    for q in range(QUERIES):
        ref = f"q{q}.jpg"
        vector = embed_image(str(folder / ref), index, Settings())
        hits = index.search(vector, k=10)
        names = [Path(h.item.image).name for h in hits]
        assert names[0] == ref and hits[0].similarity > 0.999
        variants = {f"q{q}-{v}.jpg" for v in ("resized", "recompressed", "cropped")}
        assert set(names[1:4]) == variants, (ref, names)
        worst_variant = min(h.similarity for h in hits[1:4])
        assert worst_variant > hits[4].similarity


def test_a_request_id_or_sha256_queries_with_its_stored_vector(
    corpus: tuple[Path, VectorIndex],
) -> None:
    _, index = corpus
    item = next(i for i in index.items if i.image.endswith("/q3.jpg"))
    by_request = index.search(index.vector(index.find(item.request_ids[0])), k=4)
    by_sha = index.search(index.vector(index.find(item.sha256)), k=4)
    assert by_request[0].item is item and by_sha[0].item is item
    assert [n.item.key for n in by_request] == [n.item.key for n in by_sha]


def test_hnsw_recall_at_10_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 256))
    members = centres[rng.integers(0, 50, 20_000)] + rng.normal(scale=0.6, size=(20_000, 256))
    records = (
        EmbeddingRecord(
            f"r{i}", f"file:///{i}", f"{i:064x}", "m", "1", "allow", 0.0, v.astype(np.float32)
        )
        for i, v in enumerate(members)
    )
    index = VectorIndex.build(records)
    queries = members[rng.choice(20_000, 300, replace=False)] + rng.normal(
        scale=0.3, size=(300, 256)
    )
    ann = index.search_many(queries, 10)
    exact = index.search_many(queries, 10, exact=True)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann, exact, strict=True)])
    assert recall >= 0.95, recall


def test_recall_on_real_embeddings(corpus: tuple[Path, VectorIndex]) -> None:
    _, index = corpus
    vectors = index.vectors(index.items)
    ann = index.search_many(vectors, 10)
    exact = index.search_many(vectors, 10, exact=True)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann, exact, strict=True)])
    assert recall >= 0.95, recall


def test_one_index_one_model(tmp_path: Path) -> None:
    vector = np.ones(4, dtype=np.float32)
    a = EmbeddingRecord("a", "file:///a", "a" * 64, "m1", "1", "allow", 0.1, vector)
    b = EmbeddingRecord("b", "file:///b", "b" * 64, "m2", "1", "allow", 0.1, vector)
    with pytest.raises(InvalidDataset, match="one index per model"):
        VectorIndex.build([a, b])
    with pytest.raises(InvalidDataset, match="no embeddings"):
        VectorIndex.build([])
    with pytest.raises(InvalidDataset, match="not a modq index"):
        VectorIndex.open(tmp_path)


def test_the_same_bytes_share_one_entry_listing_every_request() -> None:
    vector = np.arange(4, dtype=np.float32) + 1
    records = [
        EmbeddingRecord(f"r{i}", "file:///a", "a" * 64, "m", "1", "block", 0.9, vector)
        for i in range(3)
    ]
    index = VectorIndex.build(records)
    assert len(index) == 1 and index.items[0].request_ids == ["r0", "r1", "r2"]


def _grouped(tmp_path: Path) -> tuple[VectorIndex, dict[str, int]]:
    """Three tight groups of blocked images (each group one colour) plus allowed ones."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 32)) * 5
    records, group_of = [], {}
    for i in range(45):
        group = i % 3
        image = tmp_path / f"b{i}.png"
        Image.new("RGB", (64, 48), ((80 * group) % 256, 40, 200 - 60 * group)).save(image)
        ref = f"file://{image}"
        group_of[ref] = group
        vector = (centres[group] + rng.normal(scale=0.2, size=32)).astype(np.float32)
        records.append(EmbeddingRecord(f"b{i}", ref, f"{i:064x}", "m", "1", "block", 0.9, vector))
    for i in range(10):
        vector = rng.normal(size=32).astype(np.float32)
        records.append(
            EmbeddingRecord(
                f"a{i}", f"file:///a{i}", f"{100 + i:064x}", "m", "1", "allow", 0.1, vector
            )
        )
    return VectorIndex.build(records), group_of


@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_clusters_recover_the_groups_of_blocked_images(tmp_path: Path, method: str) -> None:
    index, group_of = _grouped(tmp_path)
    clusters = cluster_index(index, only={"block"}, method=method, k=3)  # type: ignore[arg-type]
    real = [c for c in clusters if c.label != -1]
    assert len(real) == 3
    assert sum(len(c.items) for c in clusters) == 45  # the allowed ones left out
    for c in real:
        assert len({group_of[item.image] for item in c.items}) == 1


def test_contact_sheets_show_the_images_and_mark_the_missing(tmp_path: Path) -> None:
    index, _ = _grouped(tmp_path)
    [first, *_] = cluster_index(index, only={"block"}, k=3)
    items = first.items[:7]
    (tmp_path / items[0].image.removeprefix("file://").split("/")[-1]).unlink()
    store = reader_for((i.where for i in items), Settings().storage)
    out = write_sheet(items, "cluster", tmp_path / "sheets" / "c.png", store, DecodeLimits())
    sheet = Image.open(out)
    assert sheet.format == "PNG" and sheet.size == (6 * 160, 28 + 2 * 176)
    pixels = np.asarray(sheet)
    # the second cell holds that group's colour; the first, deleted, is a grey tile
    colour = Image.open(items[1].image.removeprefix("file://")).getpixel((0, 0))
    cell = pixels[28 + 80, 160 + 80]
    assert tuple(int(c) for c in cell) == colour
    assert tuple(int(c) for c in pixels[28 + 40, 40]) == (90, 90, 90)
