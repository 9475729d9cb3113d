"""What the worker and a decoder process say to each other over a pair of pipes.

No pickle: the decoder handles hostile bytes and may have been subverted by them, so the worker
reads from it only fixed-size headers, a short JSON document and raw RGB bytes, and checks
every size and count against the limits it asked for before it allocates or trusts anything.
Each message is one header, its JSON, then its payload::

    header    4-byte kind · u32 JSON length · u64 payload length   (little-endian)

    worker → decoder   JOB     {"limits": {…}, "draft_size": n|null, "cpu_s": s,
                                "recipe": {"fit": {…}|null, "frames": b,
                                           "reduced": b}}                    the bytes
    decoder → worker   READY   {"pid": n}                                    (none)
                       FRAMES  {"format", "width", "height", "frame_count",  RGB rows of the
                                "frames": [[w, h], …], "kept": b,            kept frames, the
                                "inputs": n, "reduced": [w, h]|null}         inputs; grey rows
                       ERROR   {"code", "message"}                           (none)

The recipe (``worker.decode.prepare``) says what comes back: the sampled frames (``kept``), each
fitted to the model's input square (``inputs``: none, or one per frame), and the first frame
reduced for hashing; a JOB without one asks for the frames alone.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from worker.decode import DecodeLimits
from worker.decode.fit import Fit
from worker.decode.prepare import Recipe
from worker.errors import DecoderCrashed, ImageError, InternalError, ModqError
from worker.hashing import reduced_size

__all__ = [
    "ERROR",
    "EXIT_OUT_OF_MEMORY",
    "FRAMES",
    "HEADER",
    "JOB",
    "MAX_JSON",
    "READY",
    "FrameLayout",
    "child_error",
    "frame_layout",
    "pack",
    "parse_header",
    "parse_json",
    "read_recipe",
    "recipe_document",
]

HEADER = struct.Struct("<4sIQ")
JOB, READY, FRAMES, ERROR = b"MQDj", b"MQDr", b"MQDf", b"MQDe"
#: the exit status of a decoder that ran out of memory even while reporting it
EXIT_OUT_OF_MEMORY = 3
#: longer JSON from a decoder is a lie: a FRAMES document for the most frames is far shorter
MAX_JSON = 64 * 1024
_MAX_MESSAGE = 1000
_MAX_FORMAT = 16


def pack(kind: bytes, document: dict[str, Any], payload_len: int = 0) -> bytes:
    """One header and its JSON; the payload follows it on the wire."""
    body = json.dumps(document, separators=(",", ":")).encode()
    return HEADER.pack(kind, len(body), payload_len) + body


def parse_header(raw: bytes, expected: tuple[bytes, ...]) -> tuple[bytes, int, int]:
    """(kind, JSON length, payload length) of a header the decoder sent."""
    kind, json_len, payload_len = HEADER.unpack(raw)
    if kind not in expected:
        raise _lie(f"a message of kind {kind!r} where {expected} was due")
    if json_len > MAX_JSON:
        raise _lie(f"a {json_len}-byte document (at most {MAX_JSON})")
    return kind, json_len, payload_len


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _lie("a document that is not JSON") from exc
    if not isinstance(document, dict):
        raise _lie("a JSON document that is not an object")
    return document


def recipe_document(recipe: Recipe) -> dict[str, Any]:
    fit = recipe.fit
    return {
        "fit": None if fit is None else asdict(fit),
        "frames": recipe.frames,
        "reduced": recipe.reduced,
    }


def read_recipe(document: dict[str, Any] | None) -> Recipe:
    """The decoder's reading of a JOB's recipe (the frames alone when there is none)."""
    if document is None:
        return Recipe()
    fit = document["fit"]
    return Recipe(Fit(**fit) if fit is not None else None, document["frames"], document["reduced"])


@dataclass(frozen=True)
class FrameLayout:
    """A FRAMES answer the worker checked: the sizes of the images that follow it."""

    format: str
    width: int
    height: int
    frame_count: int
    #: each sampled frame's size as decoded
    sizes: tuple[tuple[int, int], ...]
    #: the frames' RGB rows follow
    kept: bool = True
    #: this many inputs of ``input_size`` squared follow, RGB
    inputs: int = 0
    input_size: int = 0
    #: the size of the grey reduction of the first frame that follows, if one does
    reduced: tuple[int, int] | None = None

    @property
    def payload_len(self) -> int:
        frames = sum(3 * w * h for w, h in self.sizes) if self.kept else 0
        reduced = self.reduced[0] * self.reduced[1] if self.reduced else 0
        return frames + 3 * self.inputs * self.input_size**2 + reduced


def frame_layout(
    document: dict[str, Any], payload_len: int, limits: DecodeLimits, recipe: Recipe
) -> FrameLayout:
    """The images a decoder announced, refused unless every count fits the limits it was
    given, they are what the recipe asked for, and the payload it announced is exactly their
    bytes."""
    fmt = document.get("format")
    if not isinstance(fmt, str) or not fmt.isalnum() or len(fmt) > _MAX_FORMAT:
        raise _lie(f"format {fmt!r}")
    width, height = _positive(document, "width"), _positive(document, "height")
    frame_count = _positive(document, "frame_count")
    if width * height > limits.max_pixels or frame_count > limits.max_frames:
        raise _lie(f"{width}x{height} pixels and {frame_count} frames, over the limits")
    frames = document.get("frames")
    most = min(frame_count, max(1, limits.sample_frames))
    if not isinstance(frames, list) or not 1 <= len(frames) <= most:
        raise _lie(f"a frame list {str(frames)[:80]} for {frame_count} frames")
    sizes = tuple(_size(frame) for frame in frames)
    pixels = sum(w * h for w, h in sizes)
    if pixels > limits.max_pixels:
        raise _lie(f"frames of {pixels} pixels together; the limit is {limits.max_pixels}")
    if document.get("kept") is not recipe.frames:
        raise _lie(f"kept {document.get('kept')!r} where {recipe.frames} was asked")
    inputs = 0 if recipe.fit is None else len(sizes)
    if document.get("inputs") != inputs or type(document.get("inputs")) is not int:
        raise _lie(f"{str(document.get('inputs'))[:20]} inputs where {inputs} were asked")
    reduced = _reduced(document.get("reduced"), sizes[0], recipe)
    layout = FrameLayout(
        fmt,
        width,
        height,
        frame_count,
        sizes,
        recipe.frames,
        inputs,
        recipe.fit.input_size if recipe.fit is not None else 0,
        reduced,
    )
    if payload_len != layout.payload_len:
        raise _lie(f"{payload_len} payload bytes for images of {layout.payload_len}")
    return layout


def _reduced(announced: object, first: tuple[int, int], recipe: Recipe) -> tuple[int, int] | None:
    """The reduction's size: asked for, and exactly the size the reduction gives the first
    frame (a larger one would have the worker hash megapixels outside every decode limit)."""
    if not recipe.reduced:
        if announced is not None:
            raise _lie("a reduction that was not asked for")
        return None
    size = _size(announced)
    if size != reduced_size(first):
        raise _lie(f"a reduction of {size} for a frame of {first}")
    return size


def child_error(document: dict[str, Any]) -> ModqError:
    """The image error a decoder reported, if it names one modq knows; else a lie."""
    code, message = document.get("code"), document.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise _lie("an error without a code and a message")
    message = message[:_MAX_MESSAGE]
    if code == InternalError.code:
        return InternalError(f"the decoder failed: {message}")
    known = _image_errors()
    if code not in known:
        raise _lie(f"an unknown error code {code[:40]!r}")
    return known[code](message)


def _image_errors() -> dict[str, type[ImageError]]:
    """Every image error code, new ones included: the decoder raises what decode raises."""
    found: dict[str, type[ImageError]] = {}
    pending: list[type[ImageError]] = [ImageError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def _positive(document: dict[str, Any], name: str) -> int:
    value = document.get(name)
    if type(value) is not int or value < 1:
        raise _lie(f"{name} {value!r}")
    return value


def _size(frame: object) -> tuple[int, int]:
    if (
        not isinstance(frame, list)
        or len(frame) != 2
        or not all(type(side) is int and side >= 1 for side in frame)
    ):
        raise _lie(f"a frame size {str(frame)[:40]}")
    return frame[0], frame[1]


def _lie(what: str) -> DecoderCrashed:
    return DecoderCrashed(f"the decoder process answered out of protocol ({what}); not trusted")
