"""Fixtures for the model tests.

Look-alikes (random weights, the hub presets' exact layout) are built once per session: the
tiny ones for the fast tests, the full-size ones (22 MB to 345 MB each) only when a ``slow``
test asks for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.unit.models._support import make_images, require_torch_stack

# A different seed per preset, so no two look-alikes share weights.
LOOKALIKE_SEEDS = {"marqo": 11, "falconsai": 12, "freepik": 13, "adamcodd": 14}


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return make_images(seed=0)


def _lookalike_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny: bool
) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in built:
            require_torch_stack()
            from worker.models.lookalike import build_lookalike

            kind = "tiny" if tiny else "full"
            out = tmp_path_factory.mktemp(f"{preset}-{kind}-lookalike")
            built[preset] = build_lookalike(preset, out, seed=LOOKALIKE_SEEDS[preset], tiny=tiny)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def tiny_lookalike(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_lookalike("marqo")``: the directory of that preset's tiny look-alike."""
    return _lookalike_factory(tmp_path_factory, tiny=True)


@pytest.fixture(scope="session")
def full_lookalike(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``full_lookalike("marqo")``: the directory of that preset's full-size look-alike."""
    return _lookalike_factory(tmp_path_factory, tiny=False)


def _backend_factory(lookalike: Callable[[str], Path]) -> Callable[[str], Any]:
    loaded: dict[str, Any] = {}

    def get(preset: str) -> Any:
        if preset not in loaded:
            from worker.models.factory import create_backend

            loaded[preset] = create_backend(str(lookalike(preset)), precision="fp32")
        return loaded[preset]

    return get


@pytest.fixture(scope="session")
def tiny_backend(tiny_lookalike: Callable[[str], Path]) -> Callable[[str], Any]:
    """modq's backend for a tiny look-alike, loaded from its directory once per session."""
    return _backend_factory(tiny_lookalike)


@pytest.fixture(scope="session")
def full_backend(full_lookalike: Callable[[str], Path]) -> Callable[[str], Any]:
    """modq's backend for a full-size look-alike, loaded from its directory once per session."""
    return _backend_factory(full_lookalike)


@pytest.fixture(scope="session")
def full_predictions(
    full_backend: Callable[[str], Any], images: list[Image.Image]
) -> Callable[[str], list[Any]]:
    """modq's default-path predictions (``embed=False``) for the session images, per preset."""
    done: dict[str, list[Any]] = {}

    def get(preset: str) -> list[Any]:
        if preset not in done:
            done[preset] = full_backend(preset).predict(images)
        return done[preset]

    return get


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with the hub switched off, for subprocesses started by the
    test (huggingface_hub reads these variables when it is imported)."""
    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache
