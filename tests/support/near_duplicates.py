"""Near-duplicate pairs for the perceptual cache tier: images a pHash puts within a few bits
of each other whose own scores differ.

pHash and dHash read only a small grey thumbnail, so recolouring an image while keeping every
pixel's luminance leaves its perceptual hashes where they were, while a model, which sees
colour, scores it differently. ``TintBackend`` is a deterministic model whose score is a
function of the image's colour balance, so a test can put an image's own score in any band;
``skin_pair`` is a pair the bundled open_nsfw model itself scores apart.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tests.support.images import textured
from worker.decode import DecodeLimits, decode
from worker.hashing import ImageHashes, hash_image
from worker.models.backend import Backend, BatchOutput
from worker.models.card import ModelCard
from worker.models.preprocess import draft_size

__all__ = [
    "TintBackend",
    "encode",
    "grey_texture",
    "hashes",
    "own_score",
    "recoloured",
    "skin_pair",
    "tinted",
]

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's convert("L")
GAIN = 10.0  # TintBackend: score = sigmoid(GAIN * (mean red - mean blue)), pixels in [0, 1]
SIDE = 64


class TintBackend(Backend):
    """A model whose nsfw score is sigmoid(GAIN x (mean red - mean blue)) of the image: a
    pure function of its pixels, blind to luminance, which is all a perceptual hash sees. It
    keeps open_nsfw's thresholds (review 0.2, block 0.8)."""

    card = ModelCard(
        id="test/tint",
        revision="r1",
        runtime="onnx",
        labels=("sfw", "nsfw"),
        input_size=SIDE,
        crop="squash",
        interpolation="bilinear",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        embedding_dim=3,
        extra={"review_at": 0.2, "block_at": 0.8},
    )

    def preprocess(self, image: Image.Image) -> np.ndarray:
        resized = image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        return np.asarray(resized, np.float32) / 255.0

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        means = batch.mean(axis=(1, 2), dtype=np.float64)  # (N, RGB)
        nsfw = 1.0 / (1.0 + np.exp(-GAIN * (means[:, 0] - means[:, 2])))
        probabilities = np.stack([1.0 - nsfw, nsfw], axis=1).astype(np.float32)
        return BatchOutput(probabilities, means.astype(np.float32) if embed else None)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def grey_texture(seed: int, size: int = 256) -> Image.Image:
    """A grey picture with structure, its levels squeezed into [60, 195] so a tint of tens of
    levels is never clipped (clipping would move the luminance, and with it the pHash)."""
    grey = np.asarray(textured(seed, size).convert("L"), np.float64) * (135 / 255) + 60
    return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")


def recoloured(image: Image.Image, colour: tuple[float, float, float]) -> Image.Image:
    """``image``'s luminance in ``colour``'s hue: what a perceptual hash reads is unchanged."""
    unit = np.array(colour, np.float64)
    unit /= unit @ LUMA
    luma = np.asarray(image.convert("RGB"), np.float64) @ LUMA
    return Image.fromarray(np.clip(np.round(luma[..., None] * unit), 0, 255).astype(np.uint8))


def tinted(grey: Image.Image, score: float) -> Image.Image:
    """``grey`` with red and blue pushed apart until TintBackend scores it about ``score``,
    green moved against them so every pixel keeps its luminance."""
    shift = math.log(score / (1.0 - score)) * 255.0 / (2.0 * GAIN)
    pixels = np.asarray(grey, np.float64)
    green = -(LUMA[0] - LUMA[2]) * shift / LUMA[1]
    pixels = pixels + np.array([shift, green, -shift])
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def hashes(backend: Backend, data: bytes) -> ImageHashes:
    """The hashes as the pipeline computes them: on the first frame of its (draft) decode."""
    decoded = decode(data, DecodeLimits(), draft_size(backend.card))
    return hash_image(data, decoded.frames[0])


def own_score(backend: Backend, data: bytes) -> float:
    """The model's own nsfw score for ``data``: the backend on the pipeline's decode."""
    decoded = decode(data, DecodeLimits(), draft_size(backend.card))
    return max(out.scores.nsfw_score for out in backend.predict(list(decoded.frames)))


def _blobs(seed: int, size: int = 256) -> Image.Image:
    """Soft light ellipses on a dark ground: in skin tones, open_nsfw scores them higher."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), 60)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 4, int(size / 1.5), 2))
        draw.ellipse(
            [x - w // 2, y - h // 2, x + w // 2, y + h // 2], fill=int(rng.integers(150, 220))
        )
    return image.filter(ImageFilter.GaussianBlur(10)).convert("RGB")


def skin_pair() -> tuple[bytes, bytes]:
    """Grey blobs (PNG), and the same blobs in a skin tone re-uploaded (borders cropped,
    scaled down, JPEG q80): pHash distance 6 with the libjpeg Pillow ships, and a higher
    open_nsfw score (the tests that use the pair measure both)."""
    grey = _blobs(4)
    skin = recoloured(grey, (200, 140, 110)).crop((6, 6, 250, 250)).resize((200, 200))
    return encode(grey), encode(skin, "JPEG", quality=80)
