"""PyTorch backends: timm models and transformers image classifiers.

Both return the classifier's logits and the pre-logits embedding from one forward pass: the
embedding is the tensor the classifier head reads, so asking for it costs nothing extra.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.errors import ModelConfigError
from worker.models.backend import Backend, BatchOutput
from worker.models.card import ModelCard

if TYPE_CHECKING:
    import torch

__all__ = ["TimmBackend", "TorchBackend", "TransformersBackend", "resolve_device", "torch_dtype"]

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(precision: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[precision])  # type: ignore[no-any-return]


class TorchBackend(Backend):
    def __init__(self, card: ModelCard, model: Any, device: str, precision: str = "fp32"):
        self.card = card
        self.device = resolve_device(device)
        self.precision = precision
        self.model = model.eval().to(device=self.device, dtype=torch_dtype(precision))

    @abstractmethod
    def logits_and_embedding(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pre-logits embedding of one batch."""

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(batch).to(self.device, torch_dtype(self.precision))
            logits, embedding = self.logits_and_embedding(pixels)
            probabilities = logits.float().softmax(dim=-1).cpu().numpy()
            embeddings = embedding.float().cpu().numpy() if embed else None
        if probabilities.shape != (len(batch), len(self.card.labels)):
            raise ModelConfigError(
                f"{self.card.id}: output shape {probabilities.shape} does not match "
                f"{len(batch)} inputs x {len(self.card.labels)} labels"
            )
        return BatchOutput(probabilities, embeddings)

    def with_precision(self, precision: str) -> TorchBackend:
        """A copy of this backend's model at another precision (for the parity check)."""
        import copy

        clone = copy.copy(self)
        clone.precision = precision
        clone.model = copy.deepcopy(self.model).to(dtype=torch_dtype(precision))
        return clone


class TimmBackend(TorchBackend):
    @classmethod
    def load(cls, card: ModelCard, directory: Path, device: str, precision: str) -> TimmBackend:
        from safetensors.torch import load_file

        timm = _import_timm()
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise ModelConfigError(f"{directory}: timm models load from one model.safetensors")
        extra_args = dict(card.extra.get("model_args", {}))
        if "global_pool" in card.extra:
            extra_args["global_pool"] = card.extra["global_pool"]
        model = timm.create_model(
            card.architecture, pretrained=False, num_classes=len(card.labels), **extra_args
        )
        state = load_file(str(weights))
        # strict: a head (or any weight) missing from the file is an error, never silently
        # replaced by random initialisation.
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelConfigError(
                f"{directory}: weights do not match {card.architecture}: {exc}"
            ) from exc
        return cls(card, model, device, precision)

    def logits_and_embedding(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(pixels)
        embedding = self.model.forward_head(features, pre_logits=True)
        return self.model.get_classifier()(embedding), embedding


class TransformersBackend(TorchBackend):
    @classmethod
    def load(
        cls, card: ModelCard, directory: Path, device: str, precision: str
    ) -> TransformersBackend:
        import torch

        _import_timm()  # TimmWrapper models and the image processors need torchvision
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as transformers_logging

        # Its per-tensor loading bar would break `modq scan`'s progress display.
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        model, info = AutoModelForImageClassification.from_pretrained(
            str(directory),
            use_safetensors=True,
            local_files_only=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
        # transformers initialises missing weights (a missing head!) at random and only logs
        # it: a model that is not entirely the file's is refused.
        problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "mismatched_keys")}
        if any(problems.values()):
            raise ModelConfigError(
                f"{directory}: weights do not match {card.architecture}: {problems}"
            )
        return cls(card, model, device, precision)

    def logits_and_embedding(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if hasattr(model, "timm_model"):
            features = model.timm_model.forward_features(pixels)
            embedding = model.timm_model.forward_head(features, pre_logits=True)
            return model.timm_model.get_classifier()(embedding), embedding
        if hasattr(model, "vit") and hasattr(model, "classifier"):
            # The CLS token after the final LayerNorm is what the classifier reads.
            embedding = model.vit(pixel_values=pixels).last_hidden_state[:, 0, :]
            return model.classifier(embedding), embedding
        raise ModelConfigError(
            f"{self.card.id}: architecture {self.card.architecture} is not supported "
            "(modq runs ViT and timm-wrapper image classifiers)"
        )


def _import_timm() -> Any:
    from worker.models._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    return timm
