"""Head mode: a linear probe trained on cached embeddings.

The embeddings are standardised (train-split mean and standard deviation) so one learning
rate suits every base model, whatever the scale of its features; the standardisation is
folded back into the weights afterwards, so the head reads the base model's raw pre-logits
tensor and drops into the model in place of its classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.finetune.train import History, OnEpoch, TrainOptions, class_weights, fit

if TYPE_CHECKING:
    import torch

__all__ = ["LinearHead", "train_head"]


@dataclass(frozen=True)
class LinearHead:
    """``softmax(embedding @ weight.T + bias)``, on the base model's raw embeddings."""

    weight: np.ndarray  # (labels, dim) float32
    bias: np.ndarray  # (labels,) float32

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float32)


class _Probe:
    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        split: tuple[np.ndarray, np.ndarray],
        num_classes: int,
        options: TrainOptions,
    ) -> None:
        import torch

        self.options = options
        self.train_index = torch.from_numpy(split[0])
        self.val_index = torch.from_numpy(split[1])
        raw = torch.from_numpy(features.astype(np.float32))
        self.mean = raw[self.train_index].mean(dim=0)
        self.std = raw[self.train_index].std(dim=0, correction=0).clamp_min(1e-6)
        self.x = (raw - self.mean) / self.std
        self.y = torch.from_numpy(labels)
        # Zero-initialised, as full mode's new classifier (see save.swap_classifier).
        self.layer = torch.nn.Linear(features.shape[1], num_classes)
        torch.nn.init.zeros_(self.layer.weight)
        torch.nn.init.zeros_(self.layer.bias)
        weights = class_weights(labels[split[0]], num_classes)
        self.loss = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weights))
        self.optimizer = torch.optim.AdamW(
            self.layer.parameters(), lr=options.lr, weight_decay=options.weight_decay
        )
        self.generator = torch.Generator().manual_seed(options.seed)

    def train_epoch(self) -> float:
        import torch

        self.layer.train()
        order = self.train_index[torch.randperm(len(self.train_index), generator=self.generator)]
        total = 0.0
        for start in range(0, len(order), self.options.batch_size):
            batch = order[start : start + self.options.batch_size]
            loss = self.loss(self.layer(self.x[batch]), self.y[batch])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.item()) * len(batch)
        return total / len(order)

    def evaluate(self) -> tuple[float, np.ndarray]:
        import torch

        self.layer.eval()
        with torch.no_grad():
            logits = self.layer(self.x[self.val_index])
            loss = float(self.loss(logits, self.y[self.val_index]).item())
        return loss, logits.argmax(dim=1).numpy()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.layer.state_dict().items()}

    def restore(self, state: Any) -> None:
        self.layer.load_state_dict(state)

    def folded(self) -> LinearHead:
        """W (x - mean) / std + b  =  (W / std) x + (b - (W / std) mean), in float64."""
        weight = self.layer.weight.detach().double() / self.std.double()
        bias = self.layer.bias.detach().double() - weight @ self.mean.double()
        return LinearHead(weight.float().numpy().copy(), bias.float().numpy().copy())


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    names: tuple[str, ...],
    options: TrainOptions,
    on_epoch: OnEpoch | None = None,
) -> tuple[LinearHead, History]:
    """Train a linear head on ``features`` (N, dim); ``split`` is (train, val) indices."""
    import torch

    # A probe's ops are tiny: on one thread they take microseconds, while on several each
    # one waits at a barrier for threads the OS may have given to other work (measured on
    # a busy 2-core machine: 0.1 s on one thread, 1.4 to 12 s on two, for the same run).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = _Probe(features, labels, split, len(names), options)
        history = fit(probe, labels[split[1]], names, options, on_epoch)
    finally:
        torch.set_num_threads(threads)
    return probe.folded(), history
