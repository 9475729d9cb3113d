"""What the steps of one fine-tuning run share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.finetune.data import Dataset
from worker.finetune.extract import Extraction
from worker.models.backend import Backend
from worker.models.registry import ResolvedModel

if TYPE_CHECKING:
    from worker.finetune.run import FinetuneOptions

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """The run's inputs, and what earlier steps produced for later ones."""

    options: FinetuneOptions
    dataset: Dataset
    unsafe: tuple[str, ...]
    resolved: ResolvedModel
    base: Backend
    staging: Path  # written into, then renamed to out
    out: Path
    extraction: Extraction | None = None
    split: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def modq_block(self) -> dict[str, Any]:
        card = self.base.card
        return {
            "unsafe_labels": list(self.unsafe),
            "base_model": card.id,
            "base_revision": card.revision,
            "mode": self.options.mode,
        }
