"""`modq finetune`: train on a team's own labels and write a model modq loads everywhere.

``head`` mode trains a linear probe on the base model's cached pre-logits embeddings and
writes the base model with its classifier replaced (torch models in their hub layout, ONNX
models as a new graph); ``full`` mode trains every weight of a torch model.
"""

from __future__ import annotations

from worker.finetune.data import Dataset, Sample, Skipped, scan_dataset
from worker.finetune.extract import ReadOptions
from worker.finetune.run import (
    MODE_DEFAULTS,
    FinetuneOptions,
    FinetuneResult,
    Mode,
    Progress,
    finetune,
)
from worker.finetune.train import EpochMetrics, History

__all__ = [
    "MODE_DEFAULTS",
    "Dataset",
    "EpochMetrics",
    "FinetuneOptions",
    "FinetuneResult",
    "History",
    "Mode",
    "Progress",
    "ReadOptions",
    "Sample",
    "Skipped",
    "finetune",
    "scan_dataset",
]
