"""What a fine-tune leaves beside the model: metrics.json and confusion_matrix.png.

metrics.json is the record a reviewer needs to trust the model: the data (counts per label
and split, skipped files and why), the settings, every epoch's metrics including the
untrained epoch 0, the epoch kept, and the validation confusion matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_confusion", "write_metrics"]


def write_metrics(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def plot_confusion(path: Path, matrix: np.ndarray, labels: tuple[str, ...], title: str) -> None:
    """The validation confusion matrix (rows: true label, columns: predicted), with counts."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the file is all that is wanted
    from matplotlib import pyplot as plt

    size = max(4.0, 0.6 * len(labels) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    try:
        shown = axes.imshow(matrix, cmap="Blues", vmin=0)
        figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
        ticks = np.arange(len(labels))
        axes.set_xticks(ticks, labels=list(labels), rotation=45, ha="right")
        axes.set_yticks(ticks, labels=list(labels))
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title)
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=colour)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)
