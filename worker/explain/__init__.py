"""Heatmaps that show a reviewer what drove a model's score.

``create_explainer(backend)`` picks the method the model supports: attention rollout for
the ViT presets (Marqo, Falconsai, AdamCodd, Freepik's EVA02), Grad-CAM for convolutional
models (the bundled open_nsfw, in one ONNX forward pass). ``Explainer.explain(image)`` runs
the backend's own preprocessing and returns a ``Heatmap`` over the model's input grid;
``Explainer.overlay(image, heatmap)`` lays it, colour-mapped, over the original image with
the model's resize and crop undone.
"""

from __future__ import annotations

from worker.explain.base import Explainer, Heatmap
from worker.explain.factory import create_explainer

__all__ = ["Explainer", "Heatmap", "create_explainer"]
