"""Fast tier: every preset's tiny look-alike loads from a directory, carries its preset's
card, and scores a batch exactly as it scores the same images one by one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.models._support import probability_rows, require_torch_stack
from worker.models.registry import PRESETS

HUB_PRESETS = ("marqo", "falconsai", "freepik", "adamcodd")


def _assert_batch_invariant(backend: Any, images: list[Image.Image]) -> None:
    batch = backend.predict(images, embed=True)
    single = [backend.predict([image], embed=True)[0] for image in images]
    assert len(batch) == len(single) == len(images)
    labels = backend.card.labels
    np.testing.assert_allclose(
        probability_rows(batch, labels), probability_rows(single, labels), rtol=0, atol=1e-5
    )
    for b, s in zip(batch, single, strict=True):
        assert b.scores.nsfw_score == pytest.approx(s.scores.nsfw_score, abs=1e-5)
        assert b.scores.level == s.scores.level
        if b.scores.level_scores is None:
            assert s.scores.level_scores is None
        else:
            assert s.scores.level_scores is not None
            for level, value in b.scores.level_scores.items():
                assert value == pytest.approx(s.scores.level_scores[level], abs=1e-5)
        assert b.embedding is not None and s.embedding is not None
        np.testing.assert_allclose(b.embedding, s.embedding, rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_tiny_lookalike_loads_with_its_presets_card(
    preset: str, tiny_lookalike: Callable[[str], Path], tiny_backend: Callable[[str], Any]
) -> None:
    require_torch_stack()
    directory = tiny_lookalike(preset)
    assert (directory / "config.json").is_file()
    assert (directory / "model.safetensors").is_file()
    card = tiny_backend(preset).card
    assert card.labels == PRESETS[preset].labels
    assert card.input_size == PRESETS[preset].input_size
    assert card.graded == (preset == "freepik")
    assert card.id == f"local:{directory.name}"
    assert card.revision.startswith("sha256:")
    expected_crop = {"marqo": "center", "freepik": "squash"}.get(preset, "squash_tv")
    assert card.crop == expected_crop


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_tiny_lookalike_batch_equals_one_by_one(
    preset: str, tiny_backend: Callable[[str], Any], images: list[Image.Image]
) -> None:
    require_torch_stack()
    backend = tiny_backend(preset)
    assert len(images) >= 8
    size = backend.card.input_size
    for image in images:
        pixels = backend.preprocess(image)
        assert pixels.shape == (3, size, size) and pixels.dtype == np.float32
        assert np.isfinite(pixels).all()
    _assert_batch_invariant(backend, images)


def test_opennsfw_batch_equals_one_by_one(images: list[Image.Image]) -> None:
    from worker.models.factory import create_backend

    _assert_batch_invariant(create_backend("opennsfw"), images)


def test_empty_batch(tiny_backend: Callable[[str], Any]) -> None:
    require_torch_stack()
    assert tiny_backend("marqo").predict([]) == []
