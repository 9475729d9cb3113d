"""Hub presets, full size: modq scores exactly as the reference libraries do.

Each preset's full-size look-alike (the real architecture and config files, random weights,
the hub's on-disk layout) is loaded by modq from its directory and from a fake Hugging Face
cache with the hub switched off, and compared with the library its authors use: timm for
Marqo, ``transformers.pipeline("image-classification")`` for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.models._support import (
    FULL_EMBEDDING_DIM,
    HUB_PREDICT_SCRIPT,
    assert_head_is_files_head,
    nsfw_scores,
    probability_rows,
    reference,
    require_torch_stack,
    run_python,
    save_images,
)
from worker.models.registry import PRESETS

pytestmark = pytest.mark.slow

HUB_PRESETS = ("marqo", "falconsai", "freepik", "adamcodd")
UNSAFE_LABEL = {"marqo": "NSFW", "falconsai": "nsfw", "adamcodd": "nsfw"}


@pytest.fixture(autouse=True)
def _torch_stack() -> None:
    require_torch_stack()


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_directory_load_matches_reference_library(
    preset: str,
    full_lookalike: Callable[[str], Path],
    full_backend: Callable[[str], Any],
    full_predictions: Callable[[str], list[Any]],
    images: list[Image.Image],
) -> None:
    directory = full_lookalike(preset)
    backend = full_backend(preset)
    card = backend.card
    assert card.labels == PRESETS[preset].labels
    assert card.input_size == PRESETS[preset].input_size

    ref = reference(preset, directory, images)
    assert list(card.labels) == ref.labels  # index order straight from the config

    # The same pixels reach the network ...
    ours = np.stack([backend.preprocess(image) for image in images])
    assert ours.dtype == np.float32
    assert ours.shape == ref.pixels.shape == (len(images), 3, card.input_size, card.input_size)
    np.testing.assert_allclose(ours, ref.pixels, rtol=0, atol=1e-6)

    # ... and the same probabilities come out, label by label.
    outputs = full_predictions(preset)
    got = probability_rows(outputs, card.labels)
    want = ref.matrix(card.labels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # Random weights still tell the images apart: the comparison is not between constants.
    assert np.ptp(want, axis=0).max() > 1e-3


@pytest.mark.parametrize("preset", ["marqo", "falconsai", "adamcodd"])
def test_binary_nsfw_score_is_the_unsafe_label_by_name(
    preset: str, full_backend: Callable[[str], Any], full_predictions: Callable[[str], list[Any]]
) -> None:
    card = full_backend(preset).card
    unsafe = UNSAFE_LABEL[preset]
    assert card.unsafe_labels == (unsafe,)
    if preset == "marqo":
        # Marqo's order is reversed: index 0 is the unsafe class.
        assert card.labels.index("NSFW") == 0
    for output in full_predictions(preset):
        assert output.scores.level is None and output.scores.level_scores is None
        assert output.scores.nsfw_score == pytest.approx(
            output.scores.probabilities[unsafe], abs=1e-7
        )
        safe = next(label for label in card.labels if label != unsafe)
        assert output.scores.nsfw_score == pytest.approx(
            1.0 - output.scores.probabilities[safe], abs=1e-5
        )


def test_freepik_levels_are_cumulative(
    full_backend: Callable[[str], Any], full_predictions: Callable[[str], list[Any]]
) -> None:
    card = full_backend("freepik").card
    assert card.graded
    assert card.labels == ("neutral", "low", "medium", "high")
    for output in full_predictions("freepik"):
        p = output.scores.probabilities
        levels = output.scores.level_scores
        assert levels is not None and set(levels) == {"low", "medium", "high"}
        assert levels["high"] == pytest.approx(p["high"], abs=1e-6)
        assert levels["medium"] == pytest.approx(p["medium"] + p["high"], abs=1e-6)
        assert levels["low"] == pytest.approx(p["low"] + p["medium"] + p["high"], abs=1e-6)
        assert output.scores.nsfw_score == levels["medium"]
        worst = [label for label in ("low", "medium", "high") if levels[label] >= 0.5]
        assert output.scores.level == (worst[-1] if worst else "neutral")


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_offline_hub_cache_load_matches_directory_load(
    preset: str,
    full_lookalike: Callable[[str], Path],
    full_backend: Callable[[str], Any],
    full_predictions: Callable[[str], list[Any]],
    images: list[Image.Image],
    offline_hub: Path,
    tmp_path: Path,
) -> None:
    from worker.models.lookalike import install_in_hub_cache, preset_commit

    hub_id = PRESETS[preset].hub_id
    assert hub_id is not None
    commit = preset_commit(preset)
    snapshot = install_in_hub_cache(full_lookalike(preset), offline_hub, hub_id, commit)
    paths = save_images(images, tmp_path / "images")

    result = run_python(HUB_PREDICT_SCRIPT, [preset, *map(str, paths)])

    # Resolved through the cache, at the pinned revision, by the preset's name.
    assert Path(result["path"]).resolve() == snapshot.resolve()
    assert result["revision"] == commit
    assert result["card_id"] == hub_id
    card = full_backend(preset).card
    assert tuple(result["labels"]) == card.labels
    got = np.array([[row[label] for label in card.labels] for row in result["probabilities"]])
    want = probability_rows(full_predictions(preset), card.labels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        result["nsfw_score"], nsfw_scores(full_predictions(preset)), atol=1e-6
    )


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_full_size_embedding_width(
    preset: str,
    full_backend: Callable[[str], Any],
    full_predictions: Callable[[str], list[Any]],
    images: list[Image.Image],
) -> None:
    backend = full_backend(preset)
    width = FULL_EMBEDDING_DIM[preset]
    assert backend.card.embedding_dim == width
    outputs = backend.predict(images, embed=True)
    embeddings = np.stack([output.embedding for output in outputs])
    assert embeddings.shape == (len(images), width)
    assert embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    # Asking for the embedding does not change the scores.
    np.testing.assert_allclose(
        probability_rows(outputs, backend.card.labels),
        probability_rows(full_predictions(preset), backend.card.labels),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_full_size_head_is_the_files_head(
    preset: str, full_lookalike: Callable[[str], Path], full_backend: Callable[[str], Any]
) -> None:
    assert_head_is_files_head(preset, full_lookalike(preset), full_backend(preset))


def test_freepik_weights_are_bf16_on_disk_and_run_in_fp32(
    full_lookalike: Callable[[str], Path], full_backend: Callable[[str], Any]
) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(full_lookalike("freepik") / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    backend = full_backend("freepik")
    assert {p.dtype for p in backend.model.parameters()} == {torch.float32}
