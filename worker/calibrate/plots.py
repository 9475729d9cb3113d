"""The PR and ROC curves, with the chosen thresholds marked.

Drawn on matplotlib's Agg canvas directly (no pyplot): no display, no global backend state,
safe in any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.calibrate.metrics import Choice, Operating, Sweep
from worker.errors import MissingExtra

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_pr", "plot_roc"]

# block_at drawn larger, so it still shows when review_at falls on the same point.
_MARKS = (("block_at", "tab:red", "o", 13), ("review_at", "tab:orange", "s", 7))


def _figure() -> tuple[Figure, Axes]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra(
            "calibration charts need matplotlib: pip install 'modq[analysis]'"
        ) from exc
    figure = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    return figure, axes


def _points(choice: Choice) -> list[tuple[str, str, str, int, Operating]]:
    return [
        (*mark, point) for mark, point in zip(_MARKS, (choice.block, choice.review), strict=True)
    ]


def plot_pr(table: Sweep, choice: Choice, average_precision: float, out: Path) -> Path:
    figure, axes = _figure()
    recall = np.concatenate([[0.0], table.recall])
    precision = np.concatenate([[1.0], table.precision])
    axes.step(
        recall, precision, where="post", color="tab:blue", label=f"AP = {average_precision:.3f}"
    )
    for name, colour, marker, size, point in _points(choice):
        c = point.confusion
        axes.plot(
            c.recall,
            c.precision,
            marker,
            color=colour,
            markersize=size,
            label=f"{name} = {point.threshold:.4g} (P {c.precision:.3f}, R {c.recall:.3f})",
        )
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title("precision-recall (flag when nsfw_score >= threshold)")
    axes.legend(loc="lower left")
    figure.savefig(out, format="png")
    return out


def plot_roc(table: Sweep, choice: Choice, roc_auc: float, out: Path) -> Path:
    figure, axes = _figure()
    fpr = np.concatenate([[0.0], table.false_positive_rate])
    tpr = np.concatenate([[0.0], table.recall])
    axes.plot(fpr, tpr, color="tab:blue", label=f"ROC-AUC = {roc_auc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for name, colour, marker, size, point in _points(choice):
        c = point.confusion
        axes.plot(
            c.false_positive_rate,
            c.recall,
            marker,
            color=colour,
            markersize=size,
            label=f"{name} = {point.threshold:.4g} (FPR {c.false_positive_rate:.3f}, "
            f"TPR {c.recall:.3f})",
        )
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate (recall)")
    axes.set_title("ROC (flag when nsfw_score >= threshold)")
    axes.legend(loc="lower right")
    figure.savefig(out, format="png")
    return out
