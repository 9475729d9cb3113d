"""`modq scan --embed`, `modq index build`, `modq similar` and `modq cluster` in subprocesses,
on a hub model's tiny look-alike (the hub path: timm weights, its own preprocessing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.support.cli import run_modq
from tests.support.images import distinct_images
from tests.unit.models._support import require_torch_stack


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_torch_stack()
    from worker.models.lookalike import build_lookalike

    return build_lookalike("marqo", tmp_path_factory.mktemp("marqo"), seed=21, tiny=True)


def test_scan_index_similar_cluster_on_a_hub_model(lookalike: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(distinct_images(24, seed=2)):
        (images / f"{i:02d}.jpg").write_bytes(data)
    home = tmp_path / "home"
    shards = tmp_path / "shards"

    scan = run_modq(
        "scan",
        images,
        "--model",
        lookalike,
        "--policy",
        "strict",
        "--embed",
        "--embedding-sink",
        f"file://{shards}?format=parquet",
        "--report",
        "r.jsonl",
        cwd=tmp_path,
        cache_home=home,
    )
    assert scan.returncode == 0, scan.stderr
    built = run_modq("index", "build", shards, "--out", "idx", cwd=tmp_path, cache_home=home)
    assert built.returncode == 0, built.stderr
    assert "indexed 24 images" in built.stdout
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["model"] == "local:" + lookalike.name and meta["count"] == 24

    # by image: the look-alike is no preset, so the model is named
    by_image = run_modq(
        "similar",
        images / "05.jpg",
        "--index",
        "idx",
        "--model",
        lookalike,
        "-k",
        "3",
        "--json",
        cwd=tmp_path,
        cache_home=home,
    )
    assert by_image.returncode == 0, by_image.stderr
    hits = [json.loads(line) for line in by_image.stdout.splitlines()]
    # Random weights embed every image alike (similarities around 0.9999), so which image
    # ranks first is noise here; the ranking itself is tested with the bundled model's real
    # weights (tests/unit/test_similarity.py). Here: the hub model's path end to end.
    assert len(hits) == 3
    assert all(h["similarity"] > 0.99 for h in hits)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)

    # by request id, from the scan report
    report = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    request = next(r for r in report if r["image"].endswith("/07.jpg"))
    by_request = run_modq(
        "similar",
        request["request_id"],
        "--index",
        "idx",
        "-k",
        "2",
        "--json",
        cwd=tmp_path,
        cache_home=home,
    )
    assert by_request.returncode == 0, by_request.stderr
    assert json.loads(by_request.stdout.splitlines()[0])["image"].endswith("/07.jpg")

    # without --model, a non-preset index says what to pass
    unnamed = run_modq(
        "similar", images / "05.jpg", "--index", "idx", cwd=tmp_path, cache_home=home
    )
    assert unnamed.returncode == 2 and "--model" in unnamed.stderr

    clustered = run_modq(
        "cluster", "idx", "--out", "sheets", "-k", "3", cwd=tmp_path, cache_home=home
    )
    assert clustered.returncode == 0, clustered.stderr
    summary = json.loads((tmp_path / "sheets" / "clusters.json").read_text())
    assert len(summary) == 3 and sum(len(c["images"]) for c in summary) == 24
    for cluster in summary:
        with Image.open(tmp_path / "sheets" / cluster["sheet"]) as sheet:
            assert sheet.format == "PNG" and sheet.width == 6 * 160


def test_an_index_refuses_embeddings_of_two_models(lookalike: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(distinct_images(3, seed=4)):
        (images / f"{i}.jpg").write_bytes(data)
    home = tmp_path / "home"
    for name, model in (("a.jsonl", "opennsfw"), ("b.jsonl", str(lookalike))):
        scan = run_modq(
            "scan",
            images,
            "--model",
            model,
            "--embed",
            "--no-cache",
            "--report",
            name,
            cwd=tmp_path,
            cache_home=home,
        )
        assert scan.returncode == 0, scan.stderr
    mixed = run_modq(
        "index", "build", "a.jsonl", "b.jsonl", "-o", "idx", cwd=tmp_path, cache_home=home
    )
    assert mixed.returncode == 2
    assert "[invalid_dataset]" in mixed.stderr and "one index per model" in mixed.stderr
