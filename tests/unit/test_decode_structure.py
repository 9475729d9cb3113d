"""The structure walk (worker.decode.structure), the aspect-ratio and frame-walk caps, and
the budget.

Every hostile class (tests/support/hostile_images.py: valid headers, hostile counts and
sizes, a few MB each) is refused within 5 s of CPU and 1 GiB above the baseline, measured in
a fresh process; the dearest input each class may still be at the default caps is classified
(or refused) within the same budget; ordinary images pass the walk untouched, and each cap
is exact (at the cap passes, one past it is refused), so the walk is what refuses.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Observe
from tests.support.budget import Budget, measure_budget, preset_cards
from tests.support.hostile_images import (
    AT_CAPS,
    HOSTILE,
    apng_frames,
    bmp_rle_commands,
    gif_extensions,
    gif_frames,
    jpeg_progressive,
    jpeg_segments,
    png_chunks,
    png_strip,
    tiff_huge_tile,
    tiff_pages,
    tiff_strips,
    webp_frames,
)
from worker.decode import DecodeLimits, decode
from worker.decode.structure import check_structure
from worker.errors import (
    CorruptImage,
    ExtremeAspectRatio,
    ModqError,
    TooComplex,
    TooManyFrames,
    TooManyPixels,
)
from worker.models.preprocess import preprocess

LIMITS = DecodeLimits()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"

#: what each hostile input ends in, and which check says so
EXPECTED = {
    "jpeg_50k_scans": "too_complex",
    "jpeg_1m_segments": "too_complex",
    "png_300k_chunks": "too_complex",
    "png_300k_chunks_after_idat": "too_complex",
    "apng_1000_frames": "too_many_pixels",
    "gif_1000_frames": "too_many_pixels",
    "gif_growing_canvas": "too_many_pixels",
    "gif_1m_extensions": "too_complex",
    "webp_1000_frames": "too_many_pixels",
    "tiff_40k_pages": "too_many_frames",
    "tiff_ifd_loop": "corrupt_image",
    "tiff_1m_strips": "too_complex",
    "tiff_huge_tile": "too_many_pixels",
    "bmp_rle_2m_commands": "too_complex",
    "png_1x100000": "extreme_aspect_ratio",
    "png_100000x1": "extreme_aspect_ratio",
}
#: refused by the decode-level checks (aspect ratio, frame walk), not the structure walk
DECODE_LEVEL = {"apng_1000_frames", "gif_1000_frames", "webp_1000_frames"} | {
    "png_1x100000",
    "png_100000x1",
}
#: in-memory strips given to every card's preprocess (decode refuses them; preprocess, used
#: on its own by other callers, must still stay within the budget)
STRIPS = {"strip_1x100000": (1, 100_000), "strip_100000x1": (100_000, 1),
          "strip_1x2000000": (1, 2_000_000)}  # fmt: skip


def _code(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    try:
        decode(data, limits, 512)
    except ModqError as exc:
        return exc.code
    return "classified"


def _describe(budgets: dict[str, Budget]) -> str:
    return "; ".join(
        f"{name} `{b.outcome}` {b.cpu_s:.2f} s {b.peak_mib:.0f} MiB" for name, b in budgets.items()
    )


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    return {name: make() for name, make in HOSTILE.items()}


# --- the budget, measured in a fresh process ----------------------------------------------


def test_every_hostile_class_is_refused_within_the_budget(
    hostile: dict[str, bytes], tmp_path: Path, observe: Observe
) -> None:
    assert all(len(data) <= 12 << 20 for data in hostile.values())  # a few MB each
    budgets = measure_budget({**hostile, **STRIPS}, tmp_path)
    observe(
        "image.hostile_structure",
        _describe({name: budgets[name] for name in hostile}),
        sent=len(hostile),
        received=sum(budgets[name].outcome == EXPECTED[name] for name in hostile),
        extra={"worst_cpu_s": round(max(b.cpu_s for b in budgets.values()), 3),
               "worst_peak_mib": round(max(b.peak_mib for b in budgets.values()), 1)},
    )  # fmt: skip
    for name in hostile:
        assert budgets[name].outcome == EXPECTED[name], (name, budgets[name])
    for name, budget in budgets.items():
        assert budget.within, (name, budget)
    # Refused before any pixel: far inside the budget, not just under it.
    assert max(budgets[name].cpu_s for name in hostile) < 1.0, budgets
    observe(
        "image.extreme_aspect_preprocess",
        _describe({name: budgets[name] for name in STRIPS}),
        sent=len(STRIPS),
        received=sum(budgets[name].outcome == "classified" for name in STRIPS),
    )
    for name in STRIPS:
        assert budgets[name].outcome == "classified", budgets[name]


def test_the_dearest_input_under_each_cap_is_classified_within_the_budget_by_every_preset(
    tmp_path: Path, observe: Observe
) -> None:
    """Every preset's preprocessing, and a look-alike's forward pass (Marqo's layout, random
    weights: the real weights cannot be fetched here) on every classified frame."""
    from worker.models.lookalike import build_lookalike

    marqo = build_lookalike("marqo", tmp_path / "marqo", seed=11, tiny=True)
    inputs = {name: make() for name, make in AT_CAPS.items()}
    budgets = measure_budget(inputs, tmp_path / "work", forward={"marqo": marqo}, per_preset=True)
    observe(
        "image.at_the_caps",
        _describe(budgets),
        sent=len(inputs),
        received=sum(b.within for b in budgets.values()),
        extra={"worst_cpu_s": round(max(b.cpu_s for b in budgets.values()), 3),
               "worst_peak_mib": round(max(b.peak_mib for b in budgets.values()), 1)},
    )  # fmt: skip
    for name, budget in budgets.items():
        assert budget.within, (name, budget)
    # Under the caps these are images, not refusals (except the APNG, whose 1x1 patches past
    # the first frame Pillow may refuse, and the BMP, whose second row never comes): the caps
    # are not set so low that they refuse all.
    classified = {name.split("@")[0] for name, b in budgets.items() if b.outcome == "classified"}
    assert set(AT_CAPS) - {"apng_500m_walk", "bmp_rle_100k_commands"} <= classified, budgets
    assert len(budgets) == 5 * len(AT_CAPS)  # each on its own for every preset


# --- the structure walk is what refuses ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - DECODE_LEVEL))
def test_the_structure_walk_refuses_before_pillow_parses(
    hostile: dict[str, bytes], name: str
) -> None:
    errors = {"too_complex": TooComplex, "too_many_frames": TooManyFrames,
              "too_many_pixels": TooManyPixels, "corrupt_image": CorruptImage}  # fmt: skip
    with pytest.raises(errors[EXPECTED[name]]):
        check_structure(hostile[name], LIMITS)


def test_the_caps_are_exact() -> None:
    """At a cap the walk lets the image through; one past it, it refuses: the cap, nothing
    else, decides."""
    small = replace(LIMITS, max_scans=7, max_segments=50, max_frames=5)
    cases = [
        (lambda n: jpeg_progressive(n - 1, side=64), "max_scans", TooComplex),
        (lambda n: jpeg_segments(n - 9), "max_segments", TooComplex),  # + the photo's 9
        (lambda n: png_chunks(n - 3), "max_segments", TooComplex),
        (lambda n: gif_extensions(n - 3), "max_segments", TooComplex),
        (lambda n: bmp_rle_commands(n - 1), "max_segments", TooComplex),
        (lambda n: tiff_pages(n), "max_frames", TooManyFrames),
        (lambda n: gif_frames(n, side=4), "max_frames", TooManyFrames),
        (lambda n: apng_frames(n, side=4), "max_frames", TooManyFrames),
        (lambda n: webp_frames(n, side=4), "max_frames", TooManyFrames),
    ]
    for make, field, error in cases:
        cap = getattr(small, field)
        # A TIFF page is 16 entries and values: leave the segment cap out of the page count.
        limits = small if field != "max_frames" else replace(small, max_segments=10_000)
        check_structure(make(cap), limits)
        with pytest.raises(error, match=f"{cap}"):
            check_structure(make(cap + 1), limits)


def test_the_structure_walk_reports_the_frame_walk() -> None:
    gif = check_structure(gif_frames(10, side=100), LIMITS)
    assert gif is not None and (gif.frames, gif.walk_pixels) == (10, 10 * 100 * 100)
    webp = check_structure(webp_frames(10, side=100), LIMITS)
    assert webp is not None and (webp.frames, webp.walk_pixels) == (10, 10 * 100 * 100)
    apng = check_structure(apng_frames(10, side=100), LIMITS)
    assert apng is not None and (apng.frames, apng.walk_pixels) == (10, 10 * 100 * 100)
    tiff = check_structure(tiff_pages(10), LIMITS)  # seeking a TIFF decodes no page
    assert tiff is not None and (tiff.frames, tiff.walk_pixels) == (10, 0)


def test_the_frame_walk_cap_is_exact() -> None:
    walk = 20 * 50 * 50
    at = replace(LIMITS, max_animation_pixels=walk)
    for make in (gif_frames, webp_frames):
        assert _code(make(20, side=50), at) == "classified"
        assert _code(make(20, side=50), replace(at, max_animation_pixels=walk - 1)) == (
            "too_many_pixels"
        )


def test_the_aspect_ratio_cap_is_exact() -> None:
    assert _code(png_strip(1, 100)) == "classified"
    assert _code(png_strip(100, 1)) == "classified"
    with pytest.raises(ExtremeAspectRatio, match="101x1"):
        decode(png_strip(101, 1), LIMITS)
    assert _code(png_strip(1, 101)) == "extreme_aspect_ratio"
    assert _code(png_strip(1, 101), replace(LIMITS, max_aspect_ratio=200)) == "classified"


def test_tiff_strips_and_tiles_must_fit_the_image() -> None:
    assert _code(tiff_strips(16)) == "classified"  # one strip per row: what 16 rows need
    with pytest.raises(CorruptImage, match="17 strips; its size needs 16"):
        check_structure(tiff_strips(17), LIMITS)
    for tile in (256, 1024):  # a small image in the tiles a writer would use
        assert check_structure(tiff_huge_tile(tile=tile), LIMITS) is not None
    with pytest.raises(TooManyPixels, match="2048x2048 tiles"):
        check_structure(tiff_huge_tile(tile=2048), LIMITS)


def test_a_walker_failure_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a walker must not let the image past unchecked, nor escape untyped."""

    def broken(data: bytes, limits: DecodeLimits) -> None:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr("worker.decode.check_structure", broken)
    assert _code(png_strip(4, 4)) == "corrupt_image"


# --- ordinary images pass -------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def _ordinary() -> dict[str, bytes]:
    photo = _photo(1600, 1200)
    exif = Image.Exif()
    exif[0x0112] = 6
    icc = b"\x00" * 200_000  # an ICC profile split over four APP2 segments
    frames = [_photo(160, 90, seed).quantize(16) for seed in range(300)]
    images = {path.name: path.read_bytes() for path in sorted(EXAMPLES.glob("*.jpg"))}
    return images | {
        "progressive.jpg": _encode(photo, "JPEG", progressive=True, quality=90),
        "phone.jpg": _encode(photo, "JPEG", exif=exif, icc_profile=icc, quality=95),
        "optimized.jpg": _encode(photo, "JPEG", optimize=True, subsampling=0),
        "animated-300.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated-30.webp": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:30]),
        "animated-30.png": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:30]),
        "pages.tif": _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:40]),
        "tiled.tif": _encode(photo, "TIFF", tile=(256, 256), compression="tiff_deflate"),
        "rle.bmp": bmp_rle_commands(1, height=1),
        "big.png": _encode(_photo(4000, 3000), "PNG", compress_level=1),
        "banner.png": _encode(_photo(4000, 40), "PNG"),
    }


def test_ordinary_images_pass_the_walk_and_decode() -> None:
    for name, data in _ordinary().items():
        structure = check_structure(data, LIMITS)
        assert structure is not None, name
        decoded = decode(data, LIMITS, 512)
        assert decoded.frames, name


def test_a_progressive_jpeg_from_libjpeg_has_about_ten_scans() -> None:
    """The scan cap sits ten times above what a common encoder writes."""
    data = _encode(_photo(640, 480), "JPEG", progressive=True)
    scans = data.count(b"\xff\xda")
    assert 6 <= scans <= 12
    tight = replace(LIMITS, max_scans=scans)
    check_structure(data, tight)
    with pytest.raises(TooComplex):
        check_structure(data, replace(tight, max_scans=scans - 1))


def test_png_chunks_written_by_zlib_streams_of_many_idats_pass() -> None:
    """An encoder writing one IDAT per row (a 4000-row image: 4,000 chunks) passes."""
    image = Image.new("L", (64, 4000))
    noise = np.random.default_rng(5).integers(0, 256, (4000, 64), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in noise)
    stream = zlib.compress(raw)
    step = -(-len(stream) // 4000)
    head = _encode(image, "PNG")[:33]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    idats = b"".join(chunk(b"IDAT", stream[i : i + step]) for i in range(0, len(stream), step))
    data = head + idats + chunk(b"IEND", b"")
    assert data.count(b"IDAT") >= 4000
    check_structure(data, LIMITS)
    assert np.array_equal(np.asarray(decode(data, LIMITS).frames[0])[:, :, 0], noise)


# --- preprocessing: the bounded paths give the full resize's pixels ---------------------------


def _levels(card: Any, array: np.ndarray) -> np.ndarray:
    """Back to 0..255 levels: what a difference in the model's input amounts to."""
    if card.crop == "caffe":
        return array
    return array * np.asarray(card.std, np.float32)[:, None, None] * 255.0


@pytest.mark.parametrize("size", [(30, 2000), (2000, 30), (640, 427)], ids=str)
def test_bounded_resizes_match_the_full_resize(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the one-pass threshold lowered so every resize takes the bounded path (crop box
    in source coordinates; rows first), each preset's input is the full path's to within a
    few levels, and the same on average."""
    image = _photo(*size, seed=3)
    for card in preset_cards():
        full = preprocess(card, image)
        monkeypatch.setattr("worker.decode.fit.MAX_INTERMEDIATE_PIXELS", 1000)
        bounded = preprocess(card, image)
        monkeypatch.undo()
        diff = np.abs(_levels(card, bounded) - _levels(card, full))
        assert bounded.shape == full.shape
        assert diff.mean() < 0.5, (card.id, size, diff.mean())
        assert diff.max() <= 8, (card.id, size, diff.max())
