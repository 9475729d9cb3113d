"""Build a model card from a model's own files, and a backend from a spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.errors import ModelConfigError
from worker.models.backend import Backend
from worker.models.card import ModelCard, Runtime
from worker.models.registry import OPENNSFW_SHA256, PRESETS, ResolvedModel, resolve

__all__ = ["build_card", "create_backend", "load_backend"]

# PIL's resample numbers, as preprocessor_config.json stores them.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_DEFAULT_THRESHOLDS = (0.5, 0.85)


def build_card(resolved: ResolvedModel) -> ModelCard:
    if resolved.path.suffix == ".onnx":
        return _onnx_card(resolved)
    config = _read_json(resolved.path / "config.json")
    try:
        if "model_type" not in config and "architecture" in config:
            card = _timm_card(resolved, config)
        elif config.get("model_type") == "timm_wrapper":
            card = _timm_card(resolved, config, runtime="transformers")
        else:
            card = _transformers_card(resolved, config)
    except ValueError as exc:  # the card refuses labels it cannot derive nsfw_score from
        raise ModelConfigError(f"{resolved.spec}: {exc}") from exc
    return card


def create_backend(
    spec: str, device: str = "cpu", precision: str = "fp32", threads: int = 0
) -> Backend:
    """Resolve ``spec`` and load its backend at a fixed precision (see ``precision.py``
    for ``auto``)."""
    resolved = resolve(spec)
    return load_backend(resolved, build_card(resolved), device, precision, threads)


def load_backend(
    resolved: ResolvedModel, card: ModelCard, device: str, precision: str, threads: int = 0
) -> Backend:
    if card.runtime == "onnx":
        from worker.models.onnx_backend import OnnxBackend

        if precision not in ("fp32", "auto"):
            raise ModelConfigError(f"{card.id}: the ONNX runtime runs fp32 only, not {precision}")
        return OnnxBackend(card, resolved.path, device, threads)
    _set_torch_threads(threads)
    if card.runtime == "timm":
        from worker.models.torch_backend import TimmBackend

        return TimmBackend.load(card, resolved.path, device, precision)
    from worker.models.torch_backend import TransformersBackend

    return TransformersBackend.load(card, resolved.path, device, precision)


def _set_torch_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} is not a JSON object")
    return data


def _declared_unsafe(config: dict[str, Any]) -> tuple[str, ...]:
    """The unsafe labels a fine-tune wrote into config.json's ``modq`` block (``modq
    finetune --unsafe-label``); empty for every other model. A model that declares them is
    scored as a plain classifier (nsfw_score = their summed probability), never graded."""
    block = config.get("modq") or {}
    declared = block.get("unsafe_labels", []) if isinstance(block, dict) else None
    if not isinstance(declared, list) or not all(isinstance(x, str) for x in declared):
        raise ModelConfigError(
            f"config.json: modq.unsafe_labels must be a list of label names, not {declared!r}"
        )
    return tuple(declared)


def _thresholds(resolved: ResolvedModel) -> dict[str, Any]:
    review, block = resolved.preset.thresholds if resolved.preset else _DEFAULT_THRESHOLDS
    return {"review_at": review, "block_at": block}


def _onnx_card(resolved: ResolvedModel) -> ModelCard:
    from worker.models.onnx_backend import read_card_metadata

    if resolved.revision == f"sha256:{OPENNSFW_SHA256[:16]}":
        return _opennsfw_card(resolved)
    card = read_card_metadata(resolved.path)
    if card is None:
        raise ModelConfigError(
            f"{resolved.path} carries no modq model card; export it with "
            "`modq models export-onnx SPEC` so labels and preprocessing travel with the graph"
        )
    return card


def _opennsfw_card(resolved: ResolvedModel) -> ModelCard:
    # The same graph reached by path still gets Yahoo's thresholds from the preset.
    review, block = PRESETS["opennsfw"].thresholds
    return ModelCard(
        id=resolved.model_id,
        revision=resolved.revision,
        runtime="onnx",
        labels=("sfw", "nsfw"),
        input_size=224,
        crop="caffe",
        interpolation="bilinear",
        mean=(104.0, 117.0, 123.0),
        std=(1.0, 1.0, 1.0),
        embedding_dim=1024,
        license="BSD-2-Clause",
        architecture="resnet50-thin (Caffe, open_nsfw)",
        extra={
            "onnx_input": "input:0",
            "onnx_scores": "outputs",
            "onnx_scores_kind": "probabilities",
            "onnx_embedding": "Reshape:0",
            "review_at": review,
            "block_at": block,
        },
    )


def _timm_card(
    resolved: ResolvedModel, config: dict[str, Any], runtime: Runtime = "timm"
) -> ModelCard:
    cfg = config.get("pretrained_cfg") or {}
    declared = _declared_unsafe(config)
    labels = config.get("label_names") or [str(i) for i in range(int(config.get("num_classes", 0)))]
    input_size = cfg.get("input_size", [3, 224, 224])
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash") or float(cfg.get("crop_pct", 1.0)) != 1.0:
        raise ModelConfigError(
            f"{resolved.spec}: timm crop_mode={crop_mode!r} crop_pct={cfg.get('crop_pct')} "
            "is not supported (modq runs 'center' or 'squash' with crop_pct 1.0)"
        )
    extra: dict[str, Any] = {"model_args": config.get("model_args", {}), **_thresholds(resolved)}
    if "global_pool" in config:
        extra["global_pool"] = config["global_pool"]
    return ModelCard(
        id=resolved.model_id,
        revision=resolved.revision,
        runtime=runtime,
        labels=tuple(labels),
        input_size=int(input_size[-1]),
        crop=crop_mode,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        embedding_dim=config.get("num_features"),
        # pretrained_cfg's licence is the base weights' (timm's), not the fine-tune's.
        license=resolved.preset.license if resolved.preset else "unknown",
        architecture=config.get("architecture", ""),
        graded=_graded(labels) and not declared,
        declared_unsafe=declared,
        extra=extra,
    )


def _transformers_card(resolved: ResolvedModel, config: dict[str, Any]) -> ModelCard:
    id2label = config.get("id2label") or {}
    declared = _declared_unsafe(config)
    labels = tuple(id2label[k] for k in sorted(id2label, key=int))
    processor_path = resolved.path / "preprocessor_config.json"
    processor = _read_json(processor_path) if processor_path.is_file() else {}
    size = processor.get("size") or {}
    input_size = int(
        size.get("height") or size.get("shortest_edge") or config.get("image_size", 224)
    )
    return ModelCard(
        id=resolved.model_id,
        revision=resolved.revision,
        runtime="transformers",
        labels=labels,
        input_size=input_size,
        crop="squash_tv",
        interpolation=_PIL_RESAMPLE.get(int(processor.get("resample", 2)), "bilinear"),
        mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),
        embedding_dim=config.get("hidden_size"),
        license=resolved.preset.license if resolved.preset else "unknown",
        architecture=(config.get("architectures") or [config.get("model_type", "")])[0],
        graded=_graded(labels) and not declared,
        declared_unsafe=declared,
        extra={"rescale_factor": processor.get("rescale_factor", 1 / 255), **_thresholds(resolved)},
    )


def _graded(labels: Any) -> bool:
    return [str(label).lower() for label in labels] == ["neutral", "low", "medium", "high"]
