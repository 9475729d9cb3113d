"""Grad-CAM for convolutional classifiers, in one forward pass where the graph allows it.

Grad-CAM (Selvaraju et al., 2017) weights the last convolutional maps ``A_k`` (h x w each)
by the spatially averaged gradient of a target ``y`` and keeps the positive part::

    alpha_k = 1/Z * sum_ij dy/dA_k[i, j]          (Z = h * w)
    cam     = ReLU(sum_k alpha_k * A_k)

For a network that ends ``A -> global average pool -> linear`` (open_nsfw: a 7x7 average
pool, then ``fc_nsfw``), logit ``z_c = sum_k W[k, c] * (1/Z) sum_ij A_k[i, j] + b_c`` is
linear in every ``A_k[i, j]`` with slope ``W[k, c] / Z``, whatever the input. So when the
target is a combination ``y = sum_c g_c z_c`` of logits, ``alpha_k = sum_c g_c W[k, c] / Z``
exactly: no backward pass, only the activation and the classifier's weights, both read
from the ONNX graph (the activation exposed as an extra output, the weights from the
initializers found by walking back from the score output, see ``onnx_tail``).

The target is the log-odds of ``nsfw_score``, ``y = log p_U - log p_S`` (U: the labels that
make up the score, S: the others), because it moves with the softmax probability a
reviewer sees. Its gradient with respect to the logits is ``g_c = p_c / p_U`` for c in U
and ``-p_c / p_S`` for c in S, from the same forward pass; for a binary model that is
``+1`` and ``-1``, so ``cam = ReLU(sum_k (W[k, nsfw] - W[k, sfw]) * A_k) / Z``: the logit
difference. The unit tests check this against autograd on torch networks exported to ONNX
and on open_nsfw's own tail.

Where a torch convolutional model is loaded (a timm CNN; none of the presets is one), the
general path runs autograd on the classifier head over ``forward_features``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from worker.errors import ModelConfigError
from worker.explain.base import Explainer, score_labels
from worker.explain.onnx_tail import find_conv_tail
from worker.models.card import ModelCard
from worker.models.onnx_backend import OnnxBackend, providers_for, with_extra_output
from worker.models.torch_backend import TorchBackend

__all__ = ["OnnxGradCam", "TorchGradCam", "logit_direction"]


def logit_direction(card: ModelCard, probabilities: np.ndarray) -> np.ndarray:
    """Gradient of ``log p_U - log p_S`` with respect to the logits (see the module doc)."""
    unsafe = set(score_labels(card))
    in_u = np.array([label in unsafe for label in card.labels])
    p = probabilities.astype(np.float64)
    direction = np.zeros(len(card.labels))
    for members, sign in ((in_u, 1.0), (~in_u, -1.0)):
        mass = p[members].sum()
        share = p[members] / mass if mass > 0 else np.full(members.sum(), 1.0 / members.sum())
        direction[members] = sign * share
    return direction


def _target(card: ModelCard) -> str:
    return "log-odds of " + "+".join(score_labels(card))


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max())
    return np.asarray(exp / exp.sum())


class OnnxGradCam(Explainer):
    """One-pass Grad-CAM on an ONNX graph (the bundled open_nsfw). ``InferenceSession.run``
    is thread-safe and nothing else is shared, so calls run concurrently."""

    method = "grad_cam"

    def __init__(self, backend: OnnxBackend) -> None:
        import onnx
        import onnxruntime as ort

        super().__init__(backend)
        extra = self.card.extra
        self._input = str(extra.get("onnx_input", "pixel_values"))
        self._scores = str(extra.get("onnx_scores", "logits"))
        self._logits = extra.get("onnx_scores_kind", "logits") == "logits"
        self.tail = find_conv_tail(onnx.load(str(backend.path)), self._scores)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = with_extra_output(backend.path, self.tail.activation)
        try:
            self._session = ort.InferenceSession(
                graph, options, providers=providers_for(backend.device)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelConfigError(f"{self.card.id}: cannot load the graph: {exc}") from exc

    def _relevance(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        batch = pixels[None].astype(np.float32, copy=False)
        scores, activation = self._session.run(
            [self._scores, self.tail.activation], {self._input: batch}
        )
        row = np.asarray(scores, dtype=np.float64).reshape(-1)
        maps = np.asarray(activation, dtype=np.float64)
        self._check(maps.shape)
        probabilities = _softmax(row) if self._logits else row
        channel = self.tail.weights @ logit_direction(self.card, probabilities)
        area = maps.shape[2] * maps.shape[3]
        cam = np.maximum(np.tensordot(channel, maps[0], axes=1), 0.0) / area
        return cam, _target(self.card)

    def _check(self, shape: tuple[int, ...]) -> None:
        """The walk found the structure; the shapes show whether the pool averages the
        whole map into exactly the features the linear layer reads."""
        features = self.tail.weights.shape[0]
        window = self.tail.kernel
        if len(shape) != 4 or shape[1] != features or (window and shape[2:] != window):
            raise ModelConfigError(
                f"{self.card.id}: the pool over {self.tail.activation!r} (shape {shape}, "
                f"window {window or 'global'}) does not turn it into the {features} features "
                "the linear layer reads, so it is no global average pool; Grad-CAM needs one"
            )


class TorchGradCam(Explainer):
    """Autograd Grad-CAM for a torch CNN whose ``forward_features`` returns the last conv
    maps (timm's convention). Runs on its own fp32 copy; no hooks, so no lock."""

    method = "grad_cam"

    def __init__(self, backend: TorchBackend, model: Any) -> None:
        super().__init__(backend)
        self.device = backend.device
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def _relevance(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)[None]).to(self.device, torch.float32)
        with torch.no_grad():
            maps = self.model.forward_features(x)
        if maps.ndim != 4:
            raise ModelConfigError(
                f"{self.card.id}: its features have shape {tuple(maps.shape)}, not the "
                "(N, C, H, W) maps Grad-CAM needs"
            )
        unsafe = set(score_labels(self.card))
        members = torch.tensor([label in unsafe for label in self.card.labels])
        with torch.enable_grad():
            maps = maps.detach().requires_grad_(True)
            log_p = self.model.forward_head(maps).float().log_softmax(dim=-1)[0]
            target = log_p[members].logsumexp(0) - log_p[~members].logsumexp(0)
            (gradient,) = torch.autograd.grad(target, maps)
        alpha = gradient.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((alpha * maps.detach()).sum(dim=1))[0]
        return cam.cpu().numpy().astype(np.float64), _target(self.card)
