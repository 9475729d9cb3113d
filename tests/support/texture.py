"""Generated images for the explanation tests: a flat background with (or without) one
textured patch, and the box where the patch is.

A classifier fine-tuned on these ("textured patch anywhere" -> nsfw; flat background, or a
flat patch of another colour -> sfw) can only tell them apart by looking at the texture, so
a faithful heatmap of it must put its mass on the patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "Box",
    "TexturedImage",
    "heat_mass_inside",
    "patch_side",
    "textured_image",
    "training_folder",
]

# The patch covers about this share of the image's area.
PATCH_AREA = 0.1


@dataclass(frozen=True)
class Box:
    """Pixel box in image coordinates: columns [left, right), rows [top, bottom)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        return (self.right - self.left) * (self.bottom - self.top)


@dataclass(frozen=True)
class TexturedImage:
    image: Image.Image
    box: Box | None  # where the textured patch is; None when there is none
    textured: bool


def patch_side(width: int, height: int, cell: int) -> int:
    """About ``PATCH_AREA`` of the image, in whole cells."""
    return max(1, round((PATCH_AREA * width * height) ** 0.5 / cell)) * cell


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(40, 216, 3).astype(np.int16)


def textured_image(
    rng: np.random.Generator,
    size: tuple[int, int] = (224, 224),
    kind: str = "texture",
    at: tuple[int, int] | None = None,
    cell: int = 16,
) -> TexturedImage:
    """``kind``: ``texture`` (a checkered patch), ``flat_patch`` (a patch of one other
    colour) or ``plain`` (background only). ``at``: the patch's top-left corner, by default
    a random corner of the ``cell`` lattice. Patches sit on that lattice (a ViT's patch
    size, for an image the model does not resize) so each token is all patch or all
    background: a token straddling the edge would make "an edge" a second cue."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[:] = _colour(rng)
    side = patch_side(width, height, cell)
    if at is None:
        at = (
            int(rng.integers(0, (width - side) // cell + 1)) * cell,
            int(rng.integers(0, (height - side) // cell + 1)) * cell,
        )
    box = Box(at[0], at[1], at[0] + side, at[1] + side)
    region = pixels[box.top : box.bottom, box.left : box.right]
    if kind == "texture":
        # A one-pixel checkerboard of two colours far apart: the finest texture there is,
        # and nothing a flat area (of any colour) can look like. The odd squares are always
        # the lighter ones, so the checkerboard is one fixed direction in a token's pixels
        # (the patch embedding sees it linearly) whatever the colours: a tiny ViT picks it
        # up in a few epochs on any CPU, where a sign that flips from image to image left
        # it to a chaotic run.
        rows, columns = np.indices(region.shape[:2])
        contrast = rng.integers(70, 111, 3).astype(np.int16)
        region[:] = _colour(rng) + np.where(((rows + columns) % 2)[..., None] == 1, contrast, 0)
    elif kind == "flat_patch":
        region[:] = _colour(rng)
    elif kind != "plain":
        raise ValueError(f"unknown kind {kind!r}")
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return TexturedImage(image, box if kind != "plain" else None, kind == "texture")


def training_folder(root: Path, count: int, seed: int, size: tuple[int, int]) -> Path:
    """An image folder for fine-tuning: ``nsfw/`` (textured patches) and ``sfw/`` (half
    plain, half flat patches), ``count`` images each, as PNG (lossless)."""
    rng = np.random.default_rng(seed)
    for label in ("nsfw", "sfw"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        textured_image(rng, size, "texture").image.save(root / "nsfw" / f"{i:04d}.png")
        kind = "plain" if i % 2 else "flat_patch"
        textured_image(rng, size, kind).image.save(root / "sfw" / f"{i:04d}.png")
    return root


def heat_mass_inside(heat: np.ndarray, box: Box) -> float:
    """The share of a non-negative map's total mass that lies inside ``box``."""
    total = float(heat.sum())
    if total <= 0.0:
        return 0.0
    return float(heat[box.top : box.bottom, box.left : box.right].sum()) / total
