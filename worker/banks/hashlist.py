"""What fills a bank: hash-list files and images.

A hash list has one PDQ hash per line (64 hex digits), optionally followed by comma- or
tab-separated fields: the first of them is the hash's quality (as Meta's hasher writes
``hash,quality,filename``), the rest are ignored. Blank lines and ``#`` comments are allowed. A
first line that is not a hash but a header naming a ``hash`` (or ``signal``, ``signal_value``,
``pdq``, ``indicator``) column makes the file a CSV export, as ThreatExchange's: the hash is read
from that column and the quality from a ``quality`` column if there is one.

Any malformed line rejects the whole file, naming the file and the line, so a truncated or
wrong file never half-fills a bank. A well-formed hash whose quality is below the gate is not an
error but a hash PDQ's authors say not to match on: it is skipped and its line reported, the
same rule as for images, so one weak entry in a partner's list does not block the rest.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import (
    CorruptImage,
    InvalidHashList,
    ModqError,
    ObjectNotFound,
    TooManyPixels,
)
from worker.hashing.pdq import PDQ_QUALITY_MIN, parse_pdq, pdq_hash

__all__ = [
    "HashList",
    "HashedImages",
    "SkippedImage",
    "hash_images",
    "load_hash_list",
    "open_image",
    "read_hash_list",
]

HASH_COLUMNS = ("hash", "signal", "signal_value", "pdq", "pdq_hash", "indicator")
QUALITY_COLUMNS = ("quality", "pdq_quality")


@dataclass(frozen=True)
class HashList:
    hashes: list[str]  # lowercase hex, in file order
    low_quality: list[int] = field(default_factory=list)  # line numbers skipped by the gate


@dataclass(frozen=True)
class _Columns:
    delimiter: str | None  # None: each line picks its own (a header-less list)
    hash: int
    quality: int | None

    def parse(self, line: str) -> tuple[str, int | None]:
        delimiter = self.delimiter or ("\t" if "\t" in line else ",")
        fields = [f.strip() for f in next(csv.reader([line], delimiter=delimiter))]
        if self.hash >= len(fields):
            raise ValueError(f"no field {self.hash + 1} (the hash column)")
        text = fields[self.hash]
        parse_pdq(text)
        raw = (
            fields[self.quality] if self.quality is not None and self.quality < len(fields) else ""
        )
        if not raw:
            return text.lower(), None
        if not raw.isdecimal() or int(raw) > 100:
            raise ValueError(f"quality must be a whole number from 0 to 100, got {raw[:20]!r}")
        return text.lower(), int(raw)


def _columns(line: str) -> tuple[_Columns, bool]:
    """The layout the first data line announces, and whether that line is a header."""
    delimiter = "\t" if "\t" in line else ","
    fields = [f.strip() for f in next(csv.reader([line], delimiter=delimiter))]
    try:
        parse_pdq(fields[0])
    except ValueError:
        names = [f.lower() for f in fields]
        hash_column = next((names.index(n) for n in HASH_COLUMNS if n in names), None)
        if hash_column is None:
            raise ValueError(
                "neither a PDQ hash (64 hex digits) nor a header naming a "
                f"{' / '.join(HASH_COLUMNS)} column: {line[:80]!r}"
            ) from None
        quality = next((names.index(n) for n in QUALITY_COLUMNS if n in names), None)
        return _Columns(delimiter, hash_column, quality), True
    return _Columns(None, 0, 1), False


def _lines(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidHashList(f"{path}: not a UTF-8 text file (byte {exc.start})") from exc
    except OSError as exc:
        raise InvalidHashList(f"{path}: cannot read it: {exc.strerror or exc}") from exc


def load_hash_list(path: Path, quality_min: int = PDQ_QUALITY_MIN) -> HashList:
    """Every hash of the file at or above ``quality_min`` (hashes with no quality field pass),
    with the lines of those below it; ``InvalidHashList`` on any malformed line."""
    columns: _Columns | None = None
    hashes: list[str] = []
    low_quality: list[int] = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            if columns is None:
                columns, header = _columns(line)
                if header:
                    continue
            text, quality = columns.parse(line)
        except (ValueError, csv.Error) as exc:
            raise InvalidHashList(f"{path}: line {number}: {exc}") from exc
        if quality is not None and quality < quality_min:
            low_quality.append(number)
        else:
            hashes.append(text)
    if not hashes and not low_quality:
        raise InvalidHashList(f"{path}: no PDQ hashes in the file")
    return HashList(hashes, low_quality)


def read_hash_list(path: Path) -> list[str]:
    """The hashes of a hash-list file, each as 64 lowercase hex digits; see ``load_hash_list``
    for the lines the quality gate skips."""
    return load_hash_list(path).hashes


# -- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str
    quality: int | None = None  # set when the quality gate skipped it


class HashedImages(NamedTuple):
    hashes: list[str]
    skipped: list[SkippedImage]


def open_image(path: Path) -> Image.Image:
    """An image file as displayed (EXIF orientation applied), in RGB: what the pipeline
    hashes when it checks an upload, so a banked image and its re-upload hash alike."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{path}: no such file") from exc
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"{path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"{path}: cannot decode it: {exc}") from exc


def hash_images(
    paths: Iterable[Path],
    load: Callable[[Path], Image.Image] = open_image,
    quality_min: int = PDQ_QUALITY_MIN,
) -> HashedImages:
    """The PDQ hashes of images at or above ``quality_min``. An image under the gate, or one
    that ``load`` refuses with a ``ModqError``, is skipped and reported, never banked: one bad
    file does not stop a folder."""
    hashes: list[str] = []
    skipped: list[SkippedImage] = []
    for path in paths:
        try:
            image = load(path)
        except ModqError as exc:
            skipped.append(SkippedImage(path, f"[{exc.code}] {exc}"))
            continue
        pdq = pdq_hash(image)
        if pdq.quality < quality_min:
            reason = f"PDQ quality {pdq.quality} is below {quality_min}"
            skipped.append(SkippedImage(path, reason, pdq.quality))
        else:
            hashes.append(pdq.hex)
    return HashedImages(hashes, skipped)
