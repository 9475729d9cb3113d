"""The head trap: the classifier head modq runs is the trained head stored in the file.

Loaders can drop a checkpoint's head and keep a randomly initialised one while logging only
at INFO (timm's weight overlay without ``num_classes``; transformers for a missing key). The
scores then look plausible and mean nothing, so these tests compare the loaded head with
the file's tensors, and check that a file without a head is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.models._support import (
    HEAD_PREFIXES,
    assert_head_is_files_head,
    file_head_prefix,
    loaded_head,
    probability_rows,
    require_torch_stack,
)
from worker.errors import ModelConfigError, ModelError

PRESETS_WITH_HEADS = ("marqo", "falconsai", "freepik", "adamcodd")


@pytest.fixture(autouse=True)
def _torch_stack() -> None:
    require_torch_stack()


def _rewrite_weights(
    source: Path, target: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]
) -> Path:
    """Copy a look-alike and rewrite its model.safetensors through ``edit``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    state = load_file(str(source / "model.safetensors"))
    save_file(edit(state), str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("preset", PRESETS_WITH_HEADS)
def test_loaded_head_is_the_files_head(
    preset: str, tiny_lookalike: Callable[[str], Path], tiny_backend: Callable[[str], Any]
) -> None:
    assert_head_is_files_head(preset, tiny_lookalike(preset), tiny_backend(preset))


def test_freepik_look_alike_stores_the_head_where_transformers_writes_it(
    tiny_lookalike: Callable[[str], Path],
) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny_lookalike("freepik") / "model.safetensors"))
    assert file_head_prefix("freepik", state) in HEAD_PREFIXES["freepik"]
    assert state[file_head_prefix("freepik", state) + "weight"].shape[0] == 4


def test_freepik_hub_layout_without_timm_model_prefix_loads_the_same_head(
    tiny_lookalike: Callable[[str], Path],
    tiny_backend: Callable[[str], Any],
    images: list[Image.Image],
    tmp_path: Path,
) -> None:
    """Freepik's hub file names its keys without ``timm_model.`` (transformers adds it)."""
    from worker.models.factory import create_backend

    source = tiny_lookalike("freepik")
    directory = _rewrite_weights(
        source,
        tmp_path / "freepik-unprefixed",
        lambda state: {k.removeprefix("timm_model."): v for k, v in state.items()},
    )
    backend = create_backend(str(directory), precision="fp32")
    assert_head_is_files_head("freepik", directory, backend)
    reference = tiny_backend("freepik")
    for (name, loaded), (_, want) in zip(
        backend.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert loaded.equal(want), name
    labels = backend.card.labels
    np.testing.assert_allclose(
        probability_rows(backend.predict(images), labels),
        probability_rows(reference.predict(images), labels),
        rtol=0,
        atol=1e-6,
    )


def test_marqo_head_differs_from_a_fresh_initialisation(
    tiny_lookalike: Callable[[str], Path], tiny_backend: Callable[[str], Any]
) -> None:
    """The comparison has teeth: a re-initialised head would not pass it."""
    import timm
    import torch

    backend = tiny_backend("marqo")
    torch.manual_seed(1234)
    fresh = timm.create_model(backend.card.architecture, pretrained=False, num_classes=2, depth=2)
    assert not torch.equal(fresh.head.weight, loaded_head(backend).weight)


@pytest.mark.parametrize(
    "preset",
    [
        "marqo",
        "falconsai",
        "freepik",
    ],
)
def test_weights_without_a_head_are_refused(
    preset: str, tiny_lookalike: Callable[[str], Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from worker.models.factory import create_backend

    source = tiny_lookalike(preset)
    prefix = file_head_prefix(preset, load_file(str(source / "model.safetensors")))
    directory = _rewrite_weights(
        source,
        tmp_path / f"{preset}-headless",
        lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)},
    )
    try:
        create_backend(str(directory), precision="fp32")
    except ModelError as exc:
        assert isinstance(exc, ModelConfigError)
        return
    raise AssertionError(f"{preset}: weights without a classifier head loaded with a random head")
