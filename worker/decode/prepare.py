"""What the pipeline takes from a decode: the model's input for each sampled frame and the
first frame's reduction for the perceptual hashes, and the frames themselves only when
something still needs them (PDQ for the hash banks; a model whose fitting needs torchvision).

A decoder process returns these instead of the frames, so a 1000x750 photo crosses the pipe
as a 150 KB input and a 30 KB reduction rather than 2.2 MB of RGB; in this process, ``prepare``
makes the same objects from a ``DecodedImage``, to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from worker.decode import DecodedImage, DecodeLimits, decode
from worker.decode.fit import Fit
from worker.hashing import reduce_for_hashing

__all__ = ["Prepared", "Recipe", "decode_prepared", "prepare"]


@dataclass(frozen=True)
class Recipe:
    #: fit each sampled frame to the model's input (None: no input is made)
    fit: Fit | None = None
    #: keep the frames themselves
    frames: bool = True
    #: reduce the first frame for the perceptual hashes
    reduced: bool = False


@dataclass(frozen=True)
class Prepared:
    format: str
    width: int
    height: int
    frame_count: int
    #: the size of each sampled frame as decoded (draft-reduced, EXIF-transposed)
    sizes: tuple[tuple[int, int], ...]
    #: the sampled frames, RGB, when the recipe asked for them
    frames: tuple[Image.Image, ...] = ()
    #: each sampled frame fitted to the model's input (8-bit RGB), when the recipe had a fit
    inputs: tuple[Image.Image, ...] = ()
    #: the first frame reduced for hashing (grey), when the recipe asked for it
    reduced: Image.Image | None = None

    def decoded(self) -> DecodedImage:
        """The frames as a ``DecodedImage`` (the recipe must have kept them)."""
        if len(self.frames) != len(self.sizes):
            raise ValueError("the frames were not kept")
        return DecodedImage(self.frames, self.format, self.width, self.height, self.frame_count)


def prepare(decoded: DecodedImage, recipe: Recipe) -> Prepared:
    frames = decoded.frames
    return Prepared(
        decoded.format,
        decoded.width,
        decoded.height,
        decoded.frame_count,
        tuple(frame.size for frame in frames),
        frames if recipe.frames else (),
        tuple(recipe.fit(frame) for frame in frames) if recipe.fit is not None else (),
        reduce_for_hashing(frames[0]) if recipe.reduced else None,
    )


def decode_prepared(
    data: bytes, limits: DecodeLimits, draft_size: int | None, recipe: Recipe
) -> Prepared:
    """``decode`` then ``prepare``, in this thread."""
    return prepare(decode(data, limits, draft_size), recipe)
