"""The dataset a team fine-tunes on: one sub-folder per label, images inside (the layout of
torchvision's ImageFolder), read with the same guarded decoder the pipeline uses.

Bad datasets fail early with ``InvalidDataset`` and a message that says what to fix; single
images that cannot be decoded are skipped and counted, because one corrupt file in a
thousand must not stop a training run (too many of them must, see ``max_unreadable``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.errors import InvalidDataset
from worker.models.card import UNSAFE_LABELS
from worker.scan import iter_files

__all__ = [
    "Dataset",
    "Sample",
    "Skipped",
    "choose_unsafe_labels",
    "scan_dataset",
    "stratified_split",
]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into Dataset.labels


@dataclass(frozen=True)
class Skipped:
    """An image left out of training, with the error code the decoder gave."""

    path: Path
    code: str
    message: str


@dataclass(frozen=True)
class Dataset:
    root: Path
    labels: tuple[str, ...]  # folder names, sorted: label i is folder labels[i]
    samples: tuple[Sample, ...]

    def counts(self) -> dict[str, int]:
        found = Counter(sample.label for sample in self.samples)
        return {label: found[i] for i, label in enumerate(self.labels)}


def scan_dataset(root: Path) -> Dataset:
    """List ``root``'s label folders and their image files (recursively, in name order)."""
    if not root.is_dir():
        raise InvalidDataset(f"{root} is not a folder; expected one sub-folder per label")
    folders = sorted(
        child for child in root.iterdir() if child.is_dir() and not child.name.startswith(".")
    )
    if len(folders) < 2:
        names = ", ".join(f.name for f in folders) or "none"
        raise InvalidDataset(
            f"{root} has {len(folders)} label folder(s) ({names}); fine-tuning needs at least "
            "2: one sub-folder per label, e.g. safe/ and nsfw/"
        )
    samples: list[Sample] = []
    for index, folder in enumerate(folders):
        files = list(iter_files([folder]))
        if not files:
            raise InvalidDataset(
                f"label folder {folder.name!r} holds no image files (looked for image suffixes, "
                "recursively); add images or remove the folder"
            )
        samples.extend(Sample(path, index) for path in files)
    return Dataset(root, tuple(f.name for f in folders), tuple(samples))


def choose_unsafe_labels(labels: tuple[str, ...], requested: list[str]) -> tuple[str, ...]:
    """The labels whose probability becomes ``nsfw_score``: those asked for, or else the
    folder names modq already reads as unsafe."""
    if requested:
        unknown = [name for name in requested if name not in labels]
        if unknown:
            raise InvalidDataset(
                f"--unsafe-label {', '.join(unknown)}: no such label folder "
                f"(the labels are {', '.join(labels)})"
            )
        return tuple(label for label in labels if label in requested)
    found = tuple(label for label in labels if label.lower() in UNSAFE_LABELS)
    if not found:
        raise InvalidDataset(
            f"no label folder names unsafe content (labels: {', '.join(labels)}; modq reads "
            f"{', '.join(sorted(UNSAFE_LABELS))} as unsafe): name the unsafe ones with "
            "--unsafe-label NAME"
        )
    if len(found) == len(labels):
        raise InvalidDataset("every label is unsafe; at least one label must mean safe")
    return found


def stratified_split(
    labels: np.ndarray, names: tuple[str, ...], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with each label in both, in the same proportion."""
    if not 0.0 < fraction < 1.0:
        raise InvalidDataset(f"the validation fraction must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for index, name in enumerate(names):
        members = np.flatnonzero(labels == index)
        if len(members) < 2:
            raise InvalidDataset(
                f"label {name!r} has {len(members)} readable image(s); each label needs at "
                "least 2 (one to train on, one to validate)"
            )
        members = rng.permutation(members)
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.extend(int(i) for i in members[:n_val])
        train.extend(int(i) for i in members[n_val:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)
