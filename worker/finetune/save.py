"""Write a fine-tuned torch model in the hub layout its base model came in.

The result is a complete model directory that ``--model DIR`` loads like any other: timm
models as timm writes them (config.json with ``num_classes``, ``label_names`` and the base's
``pretrained_cfg`` + model.safetensors), transformers models with ``id2label`` /
``label2id`` in config.json (written the way ``worker/models/lookalike.py`` writes the
look-alikes: ``save_pretrained``, then the base's own config.json with the new labels over
it, and its preprocessor_config.json beside it). config.json's ``modq`` block carries the
unsafe labels, which the card builder honours, and where the model came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError, ModelConfigError
from worker.finetune.head import LinearHead

if TYPE_CHECKING:
    import torch

__all__ = ["finish_output", "load_head", "staging_dir", "swap_classifier", "write_torch_model"]

MODEL_FILES = ("config.json", "model.safetensors", "model.onnx")


def swap_classifier(model: Any, num_classes: int) -> torch.nn.Linear:
    """Replace ``model``'s classifier with a linear layer for ``num_classes`` labels, all
    zeros, and return it. A zero head is the transfer recipe of BiT (Kolesnikov et al.,
    2020): the untrained model predicts uniform probabilities, so epoch 0 measures chance
    rather than the luck of a random head, and training starts from no preference."""
    import torch

    if hasattr(model, "timm_model"):  # transformers TimmWrapper
        model.timm_model.reset_classifier(num_classes)
        head = model.timm_model.get_classifier()
    elif hasattr(model, "vit") and hasattr(model, "classifier"):  # transformers ViT
        model.classifier = torch.nn.Linear(model.config.hidden_size, num_classes)
        head = model.classifier
    elif hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        head = model.get_classifier()
    else:
        raise ModelConfigError(f"cannot replace the classifier of {type(model).__name__}")
    if not isinstance(head, torch.nn.Linear):
        raise ModelConfigError(f"{type(model).__name__}: the classifier is not one linear layer")
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def load_head(layer: torch.nn.Linear, head: LinearHead) -> None:
    import torch

    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(head.weight))
        layer.bias.copy_(torch.from_numpy(head.bias))


def staging_dir(out: Path, force: bool) -> Path:
    """An empty folder beside ``out`` to write into; ``finish_output`` renames it, so an
    interrupted run never leaves a half-written model where ``--model`` would find it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any((out / name).exists() for name in MODEL_FILES) and not force:
        raise ConfigError(f"--out {out} already holds a model; pass --force to replace it")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finish_output(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def write_torch_model(
    model: Any,
    runtime: str,
    base_dir: Path,
    labels: tuple[str, ...],
    modq: dict[str, Any],
    out: Path,
) -> None:
    """Write ``model`` (its classifier already swapped) as a model directory in ``out``;
    ``runtime`` is the base card's (``timm`` or ``transformers``)."""
    config = json.loads((base_dir / "config.json").read_text())
    config["modq"] = modq
    if runtime == "timm" or hasattr(model, "timm_model"):
        config["num_classes"] = len(labels)
        config["label_names"] = list(labels)
        config.pop("id2label", None)
        config.pop("label2id", None)
    else:
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
        config.pop("num_labels", None)
    if "torch_dtype" in config:
        config["torch_dtype"] = "float32"  # trained and written in fp32
    if runtime == "timm":
        _save_timm(model, out)
    else:
        _save_transformers(model, base_dir, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _save_timm(model: Any, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))


def _save_transformers(model: Any, base_dir: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as transformers_logging

    # Its per-shard bar would break the command's own progress display.
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model.save_pretrained(str(out))
    processor = base_dir / "preprocessor_config.json"
    if processor.is_file():
        shutil.copy(processor, out / "preprocessor_config.json")
    if hasattr(model, "timm_model"):
        # The hub's timm-wrapper files store plain timm keys; transformers adds the prefix.
        weights = out / "model.safetensors"
        state = {k.removeprefix("timm_model."): v for k, v in load_file(str(weights)).items()}
        save_file(state, str(weights), metadata={"format": "pt"})
