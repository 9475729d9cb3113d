"""Attention rollout (Abnar & Zuidema, 2020) for the ViT and EVA02 models.

Per layer, the heads' attention matrices are averaged (the mean, as in the paper: a max
over heads lets one noisy head dominate), the identity is added for the residual
connection and each row is renormalised to sum to 1; the layers' matrices are multiplied,
first layer on the right. Row ``i`` of the product says how much each input token flowed
into output token ``i``. The row explained is the one the classifier reads: the CLS token
for token-pooled models (Marqo, Falconsai, AdamCodd), the mean of the patch-token rows for
average-pooled ones (Freepik's EVA02). Prefix tokens (CLS, registers) are then dropped and
the patch columns laid out on the patch grid.

Rollout is class-agnostic: it shows where the model looked, not which way that pushed the
score. Fused attention kernels never materialise the attention matrix, so each explainer
runs its own fp32 copy of the model with the unfused (eager) path: the backend the batcher
uses keeps its fast kernels and never sees a hook.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.errors import ModelConfigError
from worker.explain.base import Explainer, normalise
from worker.models.torch_backend import TorchBackend

__all__ = ["TimmRollout", "TransformersRollout", "attention_rollout"]

_POOL_QUERY = {"token": "class-agnostic (CLS token)", "avg": "class-agnostic (mean patch token)"}


def attention_rollout(
    attentions: Sequence[np.ndarray], prefix: int, pool: str, grid: tuple[int, int]
) -> np.ndarray:
    """Rollout of one image's per-layer attentions (heads x tokens x tokens each), as a
    ``grid`` of patch relevances for the token(s) ``pool`` reads."""
    tokens = attentions[0].shape[-1]
    if tokens != prefix + grid[0] * grid[1]:
        raise ModelConfigError(
            f"attention over {tokens} tokens does not match {prefix} prefix tokens and a "
            f"{grid[0]}x{grid[1]} patch grid"
        )
    rollout = np.eye(tokens)
    for layer in attentions:
        mixed = layer.astype(np.float64).mean(axis=0) + np.eye(tokens)
        mixed /= mixed.sum(axis=-1, keepdims=True)
        rollout = mixed @ rollout
    row = rollout[0] if pool == "token" else rollout[prefix:].mean(axis=0)
    return np.asarray(row[prefix:].reshape(grid), dtype=np.float64)


class _TorchRollout(Explainer):
    method = "attention_rollout"

    def __init__(self, backend: TorchBackend, model: Any) -> None:
        super().__init__(backend)
        self.device = backend.device
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def _normalise(self, grid: np.ndarray) -> np.ndarray:
        return normalise(grid, floor=True)

    def _tensor(self, pixels: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(pixels)[None]).to(self.device, torch.float32)


class TimmRollout(_TorchRollout):
    """timm VisionTransformer and Eva (Marqo; Freepik through transformers' TimmWrapper).

    Attention maps come from timm's own ``AttentionExtract`` (forward hooks on each block's
    ``attn_drop``, which receives the softmaxed attention once fused attention is off)."""

    def __init__(self, backend: TorchBackend, model: Any) -> None:
        super().__init__(backend, model)
        from worker.models._torchvision_compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from timm.utils.attention_extract import AttentionExtract

        self.pool = str(getattr(self.model, "global_pool", ""))
        self.prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        if self.pool not in _POOL_QUERY or (self.pool == "token" and self.prefix < 1):
            raise ModelConfigError(
                f"{self.card.id}: attention rollout follows the CLS token or the mean of the "
                f"patch tokens; this model pools with {self.pool!r}"
            )
        blocks = getattr(self.model, "blocks", ())
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        try:
            self.extract = AttentionExtract(
                self.model, names=["blocks.*.attn.attn_drop"], method="hook"
            )
        except RuntimeError as exc:  # timm's "No module names found matching ..."
            raise ModelConfigError(f"{self.card.id}: no attention modules found ({exc})") from exc
        if len(self.extract.names) != len(blocks):
            raise ModelConfigError(
                f"{self.card.id}: found {len(self.extract.names)} attention maps for "
                f"{len(blocks)} blocks"
            )
        rows, columns = self.model.patch_embed.grid_size
        self.grid = (int(rows), int(columns))

    def _relevance(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        import torch

        with self._lock, torch.inference_mode():
            maps = self.extract(self._tensor(pixels))
            attentions = [m[0].float().cpu().numpy() for m in maps.values()]
        grid = attention_rollout(attentions, self.prefix, self.pool, self.grid)
        return grid, _POOL_QUERY[self.pool]


class TransformersRollout(_TorchRollout):
    """transformers ViTForImageClassification (Falconsai, AdamCodd): the eager attention
    implementation returns its weights with ``output_attentions=True``."""

    def __init__(self, backend: TorchBackend, model: Any) -> None:
        super().__init__(backend, model)
        self.model.set_attn_implementation("eager")
        config = self.model.config
        side = int(config.image_size) // int(config.patch_size)
        self.grid = (side, side)

    def _relevance(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        import torch

        # No hook and no shared state: concurrent calls need no lock.
        with torch.inference_mode():
            output = self.model(pixel_values=self._tensor(pixels), output_attentions=True)
            attentions = [layer[0].float().cpu().numpy() for layer in output.attentions]
        # ViTForImageClassification classifies the CLS token (one prefix token).
        return attention_rollout(attentions, 1, "token", self.grid), _POOL_QUERY["token"]
