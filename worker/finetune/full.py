"""Full mode: every weight of a torch model trained on the team's labels.

The base model's classifier is replaced by a fresh one for the new labels; the backbone
starts from the base weights with a small learning rate, the new head (zero-initialised)
learns ten times faster, since it starts from nothing. Batches run through the backend's own
``logits_and_embedding``, the very forward pass inference runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from worker.errors import ModelConfigError
from worker.finetune.save import swap_classifier
from worker.finetune.train import TrainOptions, class_weights
from worker.models.backend import Backend

if TYPE_CHECKING:
    import torch

__all__ = ["HEAD_LR_FACTOR", "FullTrainer"]

HEAD_LR_FACTOR = 10.0


class FullTrainer:
    def __init__(
        self,
        backend: Backend,
        pixels: np.ndarray,
        labels: np.ndarray,
        split: tuple[np.ndarray, np.ndarray],
        num_classes: int,
        options: TrainOptions,
    ) -> None:
        import torch

        from worker.models.torch_backend import TorchBackend

        if not isinstance(backend, TorchBackend) or backend.precision != "fp32":
            raise ModelConfigError("full fine-tuning needs a torch model loaded in fp32")
        self.backend = backend
        self.options = options
        self.pixels, self.labels = pixels, labels
        self.train_index, self.val_index = split
        torch.manual_seed(options.seed)
        head = swap_classifier(backend.model, num_classes)
        self.model = backend.model.to(backend.device, torch.float32)
        head_ids = {id(p) for p in head.parameters()}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": backbone, "lr": options.lr},
                {"params": list(head.parameters()), "lr": options.lr * HEAD_LR_FACTOR},
            ],
            weight_decay=options.weight_decay,
        )
        weights = class_weights(labels[self.train_index], num_classes)
        self.weights = torch.from_numpy(weights).to(backend.device)
        self.generator = np.random.default_rng(options.seed)

    def _batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        device = self.backend.device
        pixels = torch.from_numpy(self.pixels[index]).to(device)
        return pixels, torch.from_numpy(self.labels[index]).to(device)

    def _loss_sum(self, pixels: torch.Tensor, target: torch.Tensor) -> tuple[Any, Any, Any]:
        """Weighted loss summed over the batch, and the batch's summed weights: their
        ratio over a whole split is the same weighted mean the head mode reports (and the
        logits, for the predictions)."""
        import torch

        logits, _ = self.backend.logits_and_embedding(pixels)
        loss = torch.nn.functional.cross_entropy(
            logits.float(), target, weight=self.weights, reduction="sum"
        )
        return loss, self.weights[target].sum(), logits

    def train_epoch(self) -> float:
        self.model.train()
        order = self.generator.permutation(self.train_index)
        total, weight = 0.0, 0.0
        for start in range(0, len(order), self.options.batch_size):
            pixels, target = self._batch(order[start : start + self.options.batch_size])
            loss, batch_weight, _ = self._loss_sum(pixels, target)
            self.optimizer.zero_grad()
            (loss / batch_weight).backward()
            self.optimizer.step()
            total += float(loss.item())
            weight += float(batch_weight.item())
        return total / weight

    def evaluate(self) -> tuple[float, np.ndarray]:
        import torch

        self.model.eval()
        total, weight, predicted = 0.0, 0.0, []
        with torch.no_grad():
            for start in range(0, len(self.val_index), self.options.batch_size):
                pixels, target = self._batch(
                    self.val_index[start : start + self.options.batch_size]
                )
                loss, batch_weight, logits = self._loss_sum(pixels, target)
                total += float(loss.item())
                weight += float(batch_weight.item())
                predicted.append(logits.argmax(dim=1).cpu().numpy())
        return total / weight, np.concatenate(predicted)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state: Any) -> None:
        self.model.load_state_dict(state)
        self.model.eval()
