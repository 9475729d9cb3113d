"""Safety and resolution errors: pickles are refused unopened, missing models say how to get
them, and remote code is never enabled."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import worker
from tests.unit.models._support import RESOLVE_ERROR_SCRIPT, probability_rows, run_python
from worker.errors import ModelError, ModelNotFound, PermanentError, UnsafeWeights
from worker.models.factory import create_backend
from worker.models.registry import PRESETS, download_command, resolve


class _CrashOnUnpickle:
    """Unpickling this calls ``int("...")``, which raises: any loader that opens the file
    as a pickle crashes instead of passing quietly."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (int, ("this file must never be unpickled",))


CRASHING_PICKLE = pickle.dumps(_CrashOnUnpickle(), protocol=4)


def test_crashing_pickle_really_crashes() -> None:
    with pytest.raises(ValueError, match="never be unpickled"):
        pickle.loads(CRASHING_PICKLE)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling attempt during the test fails loudly."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("modq tried to unpickle a weights file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    try:
        import torch
    except ImportError:
        return
    monkeypatch.setattr(torch, "load", refuse)


def _write(directory: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


@pytest.mark.usefixtures("no_unpickling")
@pytest.mark.parametrize(
    "files",
    [
        {"pytorch_model.bin": CRASHING_PICKLE},
        {
            "config.json": b'{"model_type": "vit", "id2label": {"0": "normal", "1": "nsfw"}}',
            "pytorch_model.bin": CRASHING_PICKLE,
            "optimizer.pt": CRASHING_PICKLE,
        },
        {"config.json": b"{}", "model.ckpt": CRASHING_PICKLE, "weights.pth": CRASHING_PICKLE},
    ],
    ids=["bin-only", "falconsai-pickles-with-config", "ckpt-and-pth"],
)
def test_pickle_only_directory_is_refused_unopened(files: dict[str, bytes], tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    written = _write(directory, files)
    with pytest.raises(UnsafeWeights) as info:
        create_backend(str(directory))
    assert info.value.code == "unsafe_weights"
    assert isinstance(info.value, ModelError) and isinstance(info.value, PermanentError)
    assert not info.value.retryable
    for name in files:
        if name.endswith((".bin", ".pt", ".pth", ".ckpt")):
            assert name in str(info.value)
    # Untouched.
    for name, data in written.items():
        assert (directory / name).read_bytes() == data


@pytest.mark.usefixtures("no_unpickling")
def test_safetensors_are_read_and_a_pickle_beside_them_is_ignored(
    tiny_lookalike: Callable[[str], Path],
    tiny_backend: Callable[[str], Any],
    images: list[Image.Image],
    tmp_path: Path,
) -> None:
    """Falconsai's hub repository holds pytorch_model.bin and optimizer.pt beside
    model.safetensors: only the safetensors file may be read."""
    pytest.importorskip("torch")
    directory = tmp_path / "falconsai-with-pickles"
    shutil.copytree(tiny_lookalike("falconsai"), directory)
    _write(directory, {"pytorch_model.bin": CRASHING_PICKLE, "optimizer.pt": CRASHING_PICKLE})
    backend = create_backend(str(directory))
    labels = backend.card.labels
    np.testing.assert_allclose(
        probability_rows(backend.predict(images), labels),
        probability_rows(tiny_backend("falconsai").predict(images), labels),
        rtol=0,
        atol=1e-6,
    )


def test_directory_without_weights_is_not_found(tmp_path: Path) -> None:
    _write(tmp_path / "empty-model", {"config.json": b"{}"})
    with pytest.raises(ModelNotFound, match=r"model\.safetensors"):
        resolve(str(tmp_path / "empty-model"))


@pytest.mark.parametrize(
    "spec",
    ["no-such-preset", "a/b/c", "missing/dir/model.onnx", "Marqo/nsfw image detection"],
)
def test_unknown_spec_is_not_found(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative specs must not hit anything on disk
    with pytest.raises(ModelNotFound) as info:
        create_backend(spec)
    assert info.value.code == "model_not_found"
    # The message says what a spec can be.
    for preset in PRESETS:
        assert preset in str(info.value)


def test_missing_hub_model_names_the_download_command(offline_hub: Path) -> None:
    specs = [
        "marqo",
        "falconsai",
        "freepik",
        "adamcodd",
        "Some-Org/missing-model@abc123",
        "Some-Org/missing-model",
    ]
    results = run_python(RESOLVE_ERROR_SCRIPT, specs, timeout=180)
    assert [r["spec"] for r in results] == specs
    expected = {
        **{p: download_command(PRESETS[p].hub_id or "", PRESETS[p].revision) for p in specs[:4]},
        "Some-Org/missing-model@abc123": download_command("Some-Org/missing-model", "abc123"),
        "Some-Org/missing-model": download_command("Some-Org/missing-model", None),
    }
    for result in results:
        assert result["type"] == "ModelNotFound", result
        assert result["code"] == "model_not_found"
        assert expected[result["spec"]] in result["message"], result["message"]
        assert str(offline_hub) in result["message"]  # where it looked
    # The pinned presets ask for their pinned revision; the command fetches no pickles.
    assert "--revision 0c26ec22111b83f106d72a55f611ec35962bcb65" in expected["marqo"]
    assert "--revision" not in expected["adamcodd"]
    for command in expected.values():
        assert command.endswith("--include '*.json' '*.safetensors'")


def test_download_command_is_exact() -> None:
    assert download_command("Org/name", "abc") == (
        "hf download Org/name --revision abc --include '*.json' '*.safetensors'"
    )
    assert download_command("Org/name", None) == (
        "hf download Org/name --include '*.json' '*.safetensors'"
    )


def test_no_worker_file_enables_remote_code() -> None:
    root = Path(worker.__file__).resolve().parent
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "torch_backend.py" for p in files)  # the walk found the sources
    offenders = [str(p.relative_to(root)) for p in files if b"trust_remote_code" in p.read_bytes()]
    assert offenders == []
