"""Pick the explanation method a loaded model supports."""

from __future__ import annotations

from typing import Any

from worker.errors import ModelConfigError
from worker.explain.base import Explainer
from worker.models.backend import Backend

__all__ = ["create_explainer"]


def _is_vision_transformer(model: Any) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def _timm_explainer(backend: Any, model: Any) -> Explainer:
    from worker.explain.gradcam import TorchGradCam
    from worker.explain.rollout import TimmRollout

    if _is_vision_transformer(model):
        return TimmRollout(backend, model)
    return TorchGradCam(backend, model)


def create_explainer(backend: Backend) -> Explainer:
    """Attention rollout for the ViT / EVA02 models, Grad-CAM for convolutional ones
    (one-pass on ONNX graphs, autograd on torch); ``ModelConfigError`` for anything else."""
    from worker.models.onnx_backend import OnnxBackend
    from worker.models.torch_backend import TimmBackend, TransformersBackend

    if isinstance(backend, OnnxBackend):
        from worker.explain.gradcam import OnnxGradCam

        return OnnxGradCam(backend)
    if isinstance(backend, TimmBackend):
        return _timm_explainer(backend, backend.model)
    if isinstance(backend, TransformersBackend):
        model = backend.model
        if hasattr(model, "timm_model"):
            return _timm_explainer(backend, model.timm_model)
        if hasattr(model, "vit") and hasattr(model, "classifier"):
            from worker.explain.rollout import TransformersRollout

            return TransformersRollout(backend, model)
    kind = backend.card.architecture or backend.card.runtime
    raise ModelConfigError(
        f"{backend.card.id}: modq cannot explain this model ({kind}): explanations cover "
        "ViT / EVA02 models (attention rollout) "
        "and convolutional classifiers ending in global average pooling (Grad-CAM)"
    )
