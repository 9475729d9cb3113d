"""Read a team's labelled set: a CSV of ``path,label`` rows.

Every row is checked before any image is scored, so a typo on line 4,000 fails in a second,
not after an hour of inference. Each rejection names its line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from worker.errors import InvalidDataset
from worker.models.card import ModelCard

__all__ = ["NEGATIVE_LABELS", "POSITIVE_LABELS", "LabelledImage", "label_names", "read_labels"]

POSITIVE_LABELS = frozenset({"1", "unsafe", "nsfw", "block", "true"})
NEGATIVE_LABELS = frozenset({"0", "safe", "sfw", "allow", "false"})


@dataclass(frozen=True)
class LabelledImage:
    name: str  # the path as the CSV writes it
    path: Path  # absolute, symlinks resolved
    label: int  # 1 unsafe, 0 safe
    line: int  # in the CSV, for messages


def label_names(card: ModelCard | None = None) -> dict[str, int]:
    """Accepted label spellings (lower case) → 1 (unsafe) or 0 (safe). The model's own label
    names count too: those among the card's unsafe labels are positive, the rest negative."""
    names = {name: 1 for name in POSITIVE_LABELS} | {name: 0 for name in NEGATIVE_LABELS}
    if card is not None:
        unsafe = {label.lower() for label in card.unsafe_labels}
        for label in card.labels:
            names.setdefault(label.lower(), 1 if label.lower() in unsafe else 0)
    return names


def read_labels(csv_path: Path, names: dict[str, int]) -> list[LabelledImage]:
    """The rows of ``csv_path``; paths are relative to its folder unless absolute. Blank lines
    are skipped, columns after the second ignored, one ``path,label`` header row allowed."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidDataset(f"cannot read labels file {csv_path}: {exc}") from exc
    reader = csv.reader(text.splitlines())
    base = csv_path.resolve().parent
    images: list[LabelledImage] = []
    seen: dict[Path, int] = {}
    first = True
    try:
        for row in reader:
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            header, first = first and _is_header(cells), False
            if header:
                continue
            image = _parse_row(csv_path, reader.line_num, cells, base, names)
            if image.path in seen:
                raise InvalidDataset(
                    f"{csv_path}, line {image.line}: {image.name} is already listed on line "
                    f"{seen[image.path]}"
                )
            seen[image.path] = image.line
            images.append(image)
    except csv.Error as exc:
        raise InvalidDataset(f"{csv_path}, line {reader.line_num}: {exc}") from exc
    _check_classes(csv_path, images)
    return images


def _is_header(cells: list[str]) -> bool:
    return len(cells) >= 2 and cells[0].lower() == "path" and cells[1].lower() == "label"


def _parse_row(
    csv_path: Path, line: int, cells: list[str], base: Path, names: dict[str, int]
) -> LabelledImage:
    where = f"{csv_path}, line {line}"
    if len(cells) < 2:
        raise InvalidDataset(f"{where}: expected two columns, path,label; got {cells!r}")
    raw_path, raw_label = cells[0], cells[1]
    if not raw_path:
        raise InvalidDataset(f"{where}: empty path")
    label = names.get(raw_label.lower())
    if label is None:
        raise InvalidDataset(
            f"{where}: unknown label {raw_label!r}; use one of {_spellings(names)}"
        )
    path = Path(raw_path).expanduser()
    path = Path(os.path.realpath(path if path.is_absolute() else base / path))
    if not path.is_file():
        raise InvalidDataset(f"{where}: no such file {raw_path} ({path})")
    return LabelledImage(raw_path, path, label, line)


def _spellings(names: dict[str, int]) -> str:
    positive = sorted(name for name, value in names.items() if value == 1)
    negative = sorted(name for name, value in names.items() if value == 0)
    return f"unsafe: {'/'.join(positive)}; safe: {'/'.join(negative)} (any case)"


def _check_classes(csv_path: Path, images: Iterable[LabelledImage]) -> None:
    labels = [image.label for image in images]
    if not labels:
        raise InvalidDataset(f"{csv_path}: no labelled rows")
    if len(set(labels)) < 2:
        only = "unsafe" if labels[0] == 1 else "safe"
        last = max(image.line for image in images)
        raise InvalidDataset(
            f"{csv_path}: every row up to line {last} is labelled {only}; calibration needs "
            "both safe and unsafe images"
        )
