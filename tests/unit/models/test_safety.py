"""Safety and resolution errors: pickles are refused unopened, missing models say how to get
them, and remote code is never enabled."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import worker
from tests.conftest import Observe
from tests.unit.models._support import (
    RESOLVE_ERROR_SCRIPT,
    probability_rows,
    require_torch_stack,
    run_python,
)
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


def _import_torch_stack() -> Any:
    """torch, with timm and transformers imported, or None without the ``torch`` extra.
    torch._dynamo and timm subclass ``pickle.Unpickler`` when first imported, so they must be
    imported before ``no_unpickling`` swaps that name for a function."""
    try:
        import torch
    except ImportError:
        return None
    from worker.models._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    for name in ("timm", "transformers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    return torch


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any unpickling attempt during the test fails loudly; the list records each attempt
    (so a test can report the count it saw, not assume it)."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args)[:80])
        raise AssertionError("modq tried to unpickle a weights file")

    torch = _import_torch_stack()
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    if torch is not None:
        monkeypatch.setattr(torch, "load", refuse)
    return attempts


def _write(directory: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


# Pickle-only model directories: a bare .bin, Falconsai's hub layout without its safetensors,
# and .ckpt/.pth. One test runs them all so the reliability table's row covers every layout.
PICKLE_ONLY_LAYOUTS: dict[str, dict[str, bytes]] = {
    "bin-only": {"pytorch_model.bin": CRASHING_PICKLE},
    "falconsai-pickles-with-config": {
        "config.json": b'{"model_type": "vit", "id2label": {"0": "normal", "1": "nsfw"}}',
        "pytorch_model.bin": CRASHING_PICKLE,
        "optimizer.pt": CRASHING_PICKLE,
    },
    "ckpt-and-pth": {
        "config.json": b"{}",
        "model.ckpt": CRASHING_PICKLE,
        "weights.pth": CRASHING_PICKLE,
    },
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _refusal(directory: Path) -> UnsafeWeights:
    with pytest.raises(UnsafeWeights) as info:
        create_backend(str(directory))
    return info.value


@pytest.mark.reliability
def test_pickle_only_directory_is_refused_unopened(
    no_unpickling: list[str], tmp_path: Path, observe: Observe
) -> None:
    refused: dict[str, str] = {}
    named = 0
    for layout, files in PICKLE_ONLY_LAYOUTS.items():
        directory = tmp_path / layout
        written = _write(directory, files)
        error = _refusal(directory)
        assert error.code == "unsafe_weights", layout
        assert isinstance(error, ModelError) and isinstance(error, PermanentError)
        assert not error.retryable
        pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
        assert all(name in str(error) for name in pickles), (layout, str(error))
        named += len(pickles)
        # Untouched.
        for name, data in written.items():
            assert (directory / name).read_bytes() == data, (layout, name)
        refused[layout] = error.code
    assert no_unpickling == []
    codes = ", ".join(f"{layout}: `{code}`" for layout, code in refused.items())
    observe(
        "model.pickle_only",
        f"{len(refused)} pickle-only directories refused ({codes}); the error named all "
        f"{named} pickle files; {len(no_unpickling)} unpickling calls (pickle and torch.load "
        "patched to record and raise); every file byte-identical afterwards",
        sent=len(PICKLE_ONLY_LAYOUTS),
        received=len(refused),
        lost=len(PICKLE_ONLY_LAYOUTS) - len(refused),
    )


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


# --- trust_remote_code -----------------------------------------------------------------------

# The transformers classes whose ``from_pretrained`` a load can go through: the auto classes
# modq calls, and the base classes every concrete config and model class inherits it from.
TRANSFORMERS_ENTRY_POINTS = (
    "AutoConfig",
    "AutoModelForImageClassification",
    "AutoImageProcessor",
    "PreTrainedConfig",
    "PreTrainedModel",
)
TRANSFORMERS_PRESETS = ("falconsai", "freepik")  # ViT and timm-wrapper, both via transformers

# Remote code planted in a model directory: importing it leaves a file behind, so the test
# sees whether it ran even if the import error were swallowed somewhere.
PLANTED_MODULE = """\
from pathlib import Path
Path({sentinel!r}).write_text("planted remote code ran")
raise ImportError("planted remote code must never run")
"""


def _worker_files_mentioning_remote_code() -> tuple[int, list[str]]:
    root = Path(worker.__file__).resolve().parent
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "torch_backend.py" for p in files)  # the walk found the sources
    offenders = [str(p.relative_to(root)) for p in files if b"trust_remote_code" in p.read_bytes()]
    return len(files), offenders


def test_no_worker_file_enables_remote_code() -> None:
    _, offenders = _worker_files_mentioning_remote_code()
    assert offenders == []


def _with_planted_remote_code(source: Path, directory: Path, sentinel: Path) -> Path:
    """A copy of a look-alike whose config.json points the auto classes at planted code, as a
    hostile hub repository would: only ``trust_remote_code=True`` makes transformers run it."""
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "planted.PlantedConfig",
        "AutoModelForImageClassification": "planted.PlantedModel",
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "planted.py").write_text(PLANTED_MODULE.format(sentinel=str(sentinel)))
    return directory


Call = tuple[str, str, Any]  # entry point, the class it ran for, trust_remote_code as passed


def _spy(entry: str, real: Callable[..., Any], calls: list[Call]) -> Callable[..., Any]:
    def spy(cls: type, /, *args: Any, **kwargs: Any) -> Any:
        calls.append((entry, cls.__name__, kwargs.get("trust_remote_code", "unset")))
        return real(cls, *args, **kwargs)

    return spy


def _record_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Wrap each entry point's ``from_pretrained``, recording every call and calling through
    to the real one. It stays a classmethod, so a subclass that inherits it keeps its ``cls``."""
    import transformers

    calls: list[Call] = []
    for name in TRANSFORMERS_ENTRY_POINTS:
        owner = getattr(transformers, name)
        real = inspect.getattr_static(owner, "from_pretrained").__func__
        monkeypatch.setattr(owner, "from_pretrained", classmethod(_spy(name, real, calls)))
    return calls


@pytest.mark.reliability
def test_transformers_loads_never_trust_remote_code(
    tiny_lookalike: Callable[[str], Path],
    images: list[Image.Image],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    observe: Observe,
) -> None:
    """At run time, not only in the source: every transformers load modq makes, through the
    real factory, passes no ``trust_remote_code=True``, and planted remote code never runs."""
    require_torch_stack()
    scanned, offenders = _worker_files_mentioning_remote_code()
    assert offenders == []
    sentinel = tmp_path / "planted-code-ran"
    directories = [
        _with_planted_remote_code(tiny_lookalike(p), tmp_path / p, sentinel)
        for p in TRANSFORMERS_PRESETS
    ]
    calls = _record_from_pretrained(monkeypatch)
    backends = [create_backend(str(directory)) for directory in directories]
    # The loads really went through the wrapped entry points (else the check says nothing).
    entry_points = {entry for entry, _, _ in calls}
    assert {"AutoModelForImageClassification", "AutoConfig", "PreTrainedModel"} <= entry_points
    seen = sorted({repr(value) for _, _, value in calls})
    assert all(value is not True for _, _, value in calls), calls
    assert not sentinel.exists()
    for backend in backends:  # the local classes were loaded, and they work
        assert len(backend.predict(images[:2])) == 2
    classes = sorted({cls for entry, cls, _ in calls if entry == "PreTrainedModel"})
    observe(
        "model.trust_remote_code",
        f"static: {len(offenders)} of {scanned} worker files mention it; run time: {len(calls)} "
        f"from_pretrained calls loading {len(directories)} look-alikes "
        f"({', '.join(TRANSFORMERS_PRESETS)}) whose config.json maps the auto classes to "
        f"planted code, trust_remote_code passed as {{{', '.join(seen)}}}, never True; "
        f"loaded the local {', '.join(classes)}; planted code ran: {sentinel.exists()}",
        sent=len(directories),
        received=len(backends),
        lost=len(directories) - len(backends),
    )
