"""Review heatmaps in the pipeline (real bundled model, Grad-CAM): written beside the result
for review verdicts only, and never a reason for a moderation to fail."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tests.support.images import distinct_images
from worker.actions import Actions
from worker.decode import DecodeLimits
from worker.errors import StorageUnavailable
from worker.explain import create_explainer
from worker.explain.attach import ReviewHeatmaps
from worker.messages import Verdict
from worker.models.backend import Backend
from worker.models.factory import create_backend
from worker.pipeline import Pipeline
from worker.policy import Policy
from worker.storage import LocalStore, file_ref
from worker.storage.folders import LocalFolder

REVIEW_ALL = Policy("review-all", 0.0, 1.0)
ALLOW_ALL = Policy("allow-all", 1.0, 1.0)


@pytest.fixture(scope="module")
def backend() -> Backend:
    return create_backend("opennsfw")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "uploads" / "a.jpg"
    path.parent.mkdir()
    path.write_bytes(distinct_images(1, seed=8, size=300)[0])
    return path


def _pipeline(backend: Backend, image: Path, heatmaps: ReviewHeatmaps, policy: Policy) -> Pipeline:
    store = LocalStore([image.parent])
    return Pipeline(backend, store, policy, actions=Actions(heatmaps=heatmaps))


def test_a_review_verdict_gets_a_heatmap_beside_it(
    backend: Backend, image: Path, tmp_path: Path
) -> None:
    heatmaps = ReviewHeatmaps(
        create_explainer(backend), LocalFolder(tmp_path / "heat"), DecodeLimits()
    )
    with _pipeline(backend, image, heatmaps, REVIEW_ALL) as pipeline:
        result = pipeline.process(file_ref(image))
    assert result.verdict is Verdict.REVIEW and result.hashes is not None
    assert result.explanation == file_ref(tmp_path / "heat" / f"{result.hashes.sha256}.png")
    with Image.open(image) as source:
        original = source.convert("RGB")
    with Image.open(tmp_path / "heat" / f"{result.hashes.sha256}.png") as png:
        assert png.format == "PNG" and png.size == original.size
        assert png.convert("RGB").tobytes() != original.tobytes()  # something was drawn


def test_other_verdicts_get_none(backend: Backend, image: Path, tmp_path: Path) -> None:
    heatmaps = ReviewHeatmaps(
        create_explainer(backend), LocalFolder(tmp_path / "heat"), DecodeLimits()
    )
    with _pipeline(backend, image, heatmaps, ALLOW_ALL) as pipeline:
        result = pipeline.process(file_ref(image))
    assert result.verdict is Verdict.ALLOW and result.explanation is None
    assert not (tmp_path / "heat").exists()


class BrokenFolder(LocalFolder):
    def put(self, name: str, data: bytes) -> str:
        raise StorageUnavailable("bucket unreachable")


def test_a_heatmap_that_cannot_be_written_leaves_the_result_whole(
    backend: Backend, image: Path, tmp_path: Path
) -> None:
    from worker import metrics

    before = metrics.HEATMAP_ERRORS._value.get()
    heatmaps = ReviewHeatmaps(create_explainer(backend), BrokenFolder(tmp_path), DecodeLimits())
    with _pipeline(backend, image, heatmaps, REVIEW_ALL) as pipeline:
        result = pipeline.process(file_ref(image))
    assert result.error is None and result.verdict is Verdict.REVIEW
    assert result.explanation is None
    assert metrics.HEATMAP_ERRORS._value.get() == before + 1


def test_the_heatmap_is_of_the_image_not_a_constant(backend: Backend, tmp_path: Path) -> None:
    """Two different images give two different heatmaps (the map depends on the content)."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    refs = []
    for i, data in enumerate(distinct_images(2, seed=9, size=300)):
        (folder / f"{i}.jpg").write_bytes(data)
        refs.append(file_ref(folder / f"{i}.jpg"))
    heatmaps = ReviewHeatmaps(
        create_explainer(backend), LocalFolder(tmp_path / "heat"), DecodeLimits()
    )
    actions = Actions(heatmaps=heatmaps)
    with Pipeline(backend, LocalStore([folder]), REVIEW_ALL, actions=actions) as p:
        written = [p.process(ref).explanation for ref in refs]
    blobs = [Path(str(w).removeprefix("file://")).read_bytes() for w in written]
    assert blobs[0] != blobs[1]
    assert all(Image.open(io.BytesIO(b)).format == "PNG" for b in blobs)
