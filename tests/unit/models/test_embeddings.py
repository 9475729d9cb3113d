"""Embeddings: the pre-logits tensor each reference library defines, from the same forward
pass as the scores.

Tiny look-alikes here (their widths differ from the real models': the card says which); the
full-size widths (192 / 768 / 768 / 768) are checked in the slow tier, and open_nsfw's 1024 in
test_opennsfw.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.models._support import probability_rows, reference, require_torch_stack

HUB_PRESETS = ("marqo", "falconsai", "freepik", "adamcodd")


@pytest.fixture(autouse=True)
def _torch_stack() -> None:
    require_torch_stack()


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_embedding_equals_reference_pre_logits(
    preset: str,
    tiny_lookalike: Callable[[str], Path],
    tiny_backend: Callable[[str], Any],
    images: list[Image.Image],
) -> None:
    backend = tiny_backend(preset)
    outputs = backend.predict(images, embed=True)
    embeddings = np.stack([output.embedding for output in outputs])
    assert backend.card.embedding_dim is not None
    assert embeddings.shape == (len(images), backend.card.embedding_dim)
    assert embeddings.dtype == np.float32

    ref = reference(preset, tiny_lookalike(preset), images, embed=True)
    assert ref.embeddings is not None
    np.testing.assert_allclose(embeddings, ref.embeddings, rtol=0, atol=1e-4)
    # Different images, different embeddings (not a constant or a broadcast row).
    assert np.ptp(embeddings, axis=0).max() > 1e-2
    # And the scores that come with them are the reference scores.
    np.testing.assert_allclose(
        probability_rows(outputs, backend.card.labels),
        ref.matrix(backend.card.labels),
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_embedding_comes_with_the_same_scores(
    preset: str, tiny_backend: Callable[[str], Any], images: list[Image.Image]
) -> None:
    backend = tiny_backend(preset)
    with_embedding = backend.predict(images, embed=True)
    plain = backend.predict(images)
    assert all(output.embedding is None for output in plain)
    assert all(output.embedding is not None for output in with_embedding)
    labels = backend.card.labels
    np.testing.assert_allclose(
        probability_rows(with_embedding, labels), probability_rows(plain, labels), rtol=0, atol=1e-6
    )
    for a, b in zip(with_embedding, plain, strict=True):
        assert a.scores.nsfw_score == pytest.approx(b.scores.nsfw_score, abs=1e-6)
        assert a.scores.level == b.scores.level


@pytest.mark.parametrize("preset", ["falconsai", "adamcodd"])
def test_vit_embedding_is_after_the_final_layernorm(
    preset: str,
    tiny_lookalike: Callable[[str], Path],
    tiny_backend: Callable[[str], Any],
    images: list[Image.Image],
) -> None:
    """``hidden_states[-1]`` is the CLS token *before* the final LayerNorm: a different
    vector, and not what the classifier reads."""
    import torch
    from transformers import AutoModelForImageClassification

    backend = tiny_backend(preset)
    model = AutoModelForImageClassification.from_pretrained(
        str(tiny_lookalike(preset)), dtype=torch.float32
    ).eval()
    pixels = torch.from_numpy(np.stack([backend.preprocess(image) for image in images]))
    with torch.inference_mode():
        out = model.vit(pixel_values=pixels, output_hidden_states=True)
        before_norm = out.hidden_states[-1][:, 0].numpy()
        logits = model.classifier(out.last_hidden_state[:, 0]).softmax(-1).numpy()
    embeddings = np.stack([o.embedding for o in backend.predict(images, embed=True)])
    assert not np.allclose(embeddings, before_norm, atol=1e-2)
    np.testing.assert_allclose(
        probability_rows(backend.predict(images), backend.card.labels), logits, rtol=0, atol=1e-5
    )
