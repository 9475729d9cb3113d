"""decode(): typed refusals for hostile input, correct frames for every image the corpus holds."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import Observe
from tests.support.corpus import build_corpus, gif_blocks, hostile_samples
from tests.support.fuzz_decode import FUZZ_LIMITS, check_decoded, measure, seed_images
from worker.decode import DecodedImage, DecodeLimits, decode, sample_indices
from worker.errors import (
    CorruptImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    ModqError,
    PermanentError,
    ResourceExhausted,
    TooManyFrames,
    TooManyPixels,
    UnsupportedFormat,
)

LIMITS = DecodeLimits()
RELIABILITY = pytest.mark.reliability


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus mild noise): compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / (width / 6.0))
    g = 128 + 100 * np.cos(y / (height / 5.0))
    b = 255 * (x + y) / (width + height)
    pixels = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _attempt(
    data: bytes, limits: DecodeLimits = LIMITS, draft: int | None = None
) -> tuple[DecodedImage | ModqError, float]:
    """decode() once: what it returned or the ModqError it raised, and the seconds it took.
    The tests report it before they assert on it, so a failing run still says what it saw."""
    started = time.perf_counter()
    try:
        result: DecodedImage | ModqError = decode(data, limits, draft)
    except ModqError as exc:
        result = exc
    return result, time.perf_counter() - started


def _said(result: DecodedImage | ModqError) -> str:
    """An outcome, in the words of the reliability table."""
    if isinstance(result, ModqError):
        message = str(result)
        return f"`{result.code}` ({message[:90] + '…' if len(message) > 90 else message})"
    modes = ", ".join(sorted({frame.mode for frame in result.frames}))
    return (
        f"decoded as {result.format} {result.width}x{result.height}, "
        f"{len(result.frames)} {modes} frame(s)"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def _code(result: DecodedImage | ModqError) -> str:
    return f"`{result.code}`" if isinstance(result, ModqError) else "decoded"


# --- hostile input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    return hostile_samples()


def _case(name: str, error: type[ModqError], code: str, scenario: str | None = None) -> Any:
    """One hostile sample; the ones that are a reliability scenario report its row."""
    return pytest.param(name, error, code, scenario, id=name, marks=[RELIABILITY] * bool(scenario))


@pytest.mark.parametrize(
    ("name", "error", "code", "scenario"),
    [
        _case("empty", EmptyImage, "empty_image", "image.zero_bytes"),
        _case("random", UnsupportedFormat, "unsupported_format", "image.random_bytes"),
        _case("svg", UnsupportedFormat, "unsupported_format", "image.svg"),
        _case("text_as_jpg", UnsupportedFormat, "unsupported_format"),
        _case("truncated_jpeg", CorruptImage, "corrupt_image", "image.truncated_jpeg"),
        _case("truncated_png", CorruptImage, "corrupt_image", "image.truncated_png"),
    ],
)
def test_hostile_sample_gets_its_typed_error(
    hostile: dict[str, bytes],
    tmp_path: Path,
    observe: Observe,
    name: str,
    error: type[ModqError],
    code: str,
    scenario: str | None,
) -> None:
    data = _write(tmp_path, name, hostile[name]).read_bytes()
    result, took = _attempt(data)
    if scenario:
        said = f"{_said(result)} for {len(data):,} bytes, in {_ms(took)}"
        observe(scenario, said, sent=1, received=1)
    assert isinstance(result, error)
    assert result.code == code
    assert isinstance(result, ImageError)
    assert isinstance(result, PermanentError)
    assert not result.retryable


def _memory(figures: dict[str, float]) -> str:
    return (
        f"peak RSS grew {figures['rss_growth_mib']:.1f} MiB, peak address space "
        f"{figures['vm_peak_growth_mib']:.1f} MiB, Python-traced peak "
        f"{figures['traced_peak_mib'] * 1024:.0f} KiB"
    )


@RELIABILITY
def test_png_bomb_is_refused_from_its_header(
    hostile: dict[str, bytes], tmp_path: Path, observe: Observe
) -> None:
    """Measured in a fresh process under the fuzz harness's address-space cap: peak memory is
    process-wide, and an attempt to allocate the bomb would fail there, not pass unseen."""
    data = _write(tmp_path, "bomb.png", hostile["png_bomb"]).read_bytes()
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (100_000, 100_000)  # the sample really is a bomb
    run = measure(data, tmp_path / "measure", LIMITS)
    seen = run.summary
    observe(
        "image.png_bomb",
        f"`{seen.get('outcome', run.failure)}` for a {len(data)}-byte PNG whose IHDR declares "
        f"{width:,}x{height:,} ({width * height * 3 / 1e9:.0f} GB as RGB), in "
        f"{_ms(seen.get('seconds', 0.0))}; {_memory(seen) if seen else run.output[-300:]}",
        sent=1,
        received=int(bool(seen)),
        lost=int(not seen),
    )
    assert run.failure is None, run.output
    assert seen["outcome"] == "too_many_pixels"
    # 10^10 pixels would take minutes and tens of GB to decode: refusing it is instant, and
    # nothing of the size of even one row (300 kB) is allocated.
    assert seen["seconds"] < 1.0
    assert seen["rss_growth_mib"] < 4 and seen["vm_peak_growth_mib"] < 4, seen
    assert seen["traced_peak_mib"] < 0.25, seen


def test_pixel_cap_is_our_own_not_pillows(tmp_path: Path) -> None:
    data = _write(tmp_path, "wide.png", _encode(Image.new("L", (2000, 1000)), "PNG")).read_bytes()
    assert decode(data, DecodeLimits(max_pixels=2_000_000)).width == 2000
    with pytest.raises(TooManyPixels):
        decode(data, DecodeLimits(max_pixels=1_999_999))


@RELIABILITY
def test_gif_with_10_000_frames(
    hostile: dict[str, bytes], tmp_path: Path, observe: Observe
) -> None:
    data = _write(tmp_path, "many.gif", hostile["gif_many_frames"]).read_bytes()
    # Counted from the image descriptors, not by Pillow: the sample really has 10,000 frames.
    frames = sum(block[0] == 0x2C for block in gif_blocks(data)[1])
    assert frames == 10_000 > LIMITS.max_frames
    result, _ = _attempt(data)
    run = measure(data, tmp_path / "measure", LIMITS)  # at the shipped limits, in a fresh process
    seen = run.summary
    observe(
        "image.gif_10k_frames",
        f"{_said(result)} for a {len(data):,}-byte GIF of {frames:,} frames at the default "
        f"limit of {LIMITS.max_frames:,}; in a fresh process: `{seen.get('outcome')}` in "
        f"{_ms(seen.get('seconds', 0.0))}, {_memory(seen) if seen else run.output[-300:]}",
        sent=1,
        received=int(isinstance(result, ModqError)),
    )
    assert isinstance(result, TooManyFrames)
    assert result.code == "too_many_frames"
    # The structure walk stops at the first frame past the cap, before Pillow counts any.
    assert f"over {LIMITS.max_frames:,} frames" in str(result)
    assert run.failure is None, run.output
    assert seen["outcome"] == "too_many_frames"
    assert seen["seconds"] < 5.0
    assert seen["rss_growth_mib"] < 64, seen  # no frame decoded: 10,000 canvases would be more


@RELIABILITY
def test_bytes_over_the_cap(tmp_path: Path, observe: Observe) -> None:
    data = _write(tmp_path, "a.png", _encode(_photo(64, 48), "PNG")).read_bytes()
    at_cap, _ = _attempt(data, DecodeLimits(max_bytes=len(data)))
    below, _ = _attempt(data, DecodeLimits(max_bytes=len(data) - 1))
    # At the shipped cap: a valid PNG padded to one byte over it, refused before it is parsed.
    big = data + bytes(LIMITS.max_bytes + 1 - len(data))
    result, took = _attempt(big)
    observe(
        "image.over_byte_cap",
        f"{_said(result)} for a {len(big):,}-byte PNG ({len(big) - LIMITS.max_bytes} byte over "
        f"the default cap), in {_ms(took)}; a {len(data):,}-byte PNG is {_code(at_cap)} under a "
        f"cap of its own size, {_code(below)} one byte below it",
        sent=3,
        received=3,
    )
    assert isinstance(at_cap, DecodedImage)
    assert isinstance(below, ImageTooLarge)
    assert below.code == "image_too_large"
    assert isinstance(result, ImageTooLarge)
    assert took < 0.5  # a length check: nothing was read or parsed


def test_bytes_cap_is_checked_before_anything_else() -> None:
    # Garbage that is also too big: the cheap byte check answers first.
    with pytest.raises(ImageTooLarge):
        decode(b"\x00" * 1001, DecodeLimits(max_bytes=1000))


@RELIABILITY
def test_polyglot_decodes_as_the_jpeg_it_starts_with(
    hostile: dict[str, bytes], tmp_path: Path, observe: Observe
) -> None:
    data = _write(tmp_path, "polyglot.jpg", hostile["polyglot"]).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # it really is a ZIP as well
        names = archive.namelist()
    jpeg = data[: data.rindex(b"PK\x03\x04")]  # the JPEG in front of the ZIP's only entry
    result, took = _attempt(data)
    alone = decode(jpeg, LIMITS)
    same = isinstance(result, DecodedImage) and np.array_equal(
        np.asarray(result.frames[0]), np.asarray(alone.frames[0])
    )
    observe(
        "image.polyglot",
        f"{_said(result)} from {len(data):,} bytes (a {len(jpeg):,}-byte JPEG, then a ZIP "
        f"holding {', '.join(names)}), in {_ms(took)}; pixels "
        f"{'identical to' if same else 'not those of'} the JPEG decoded alone",
        sent=1,
        received=1,
    )
    assert isinstance(result, DecodedImage)
    assert result.format == "JPEG"
    assert same


def _growing_gif(small: int, big: tuple[int, int], small_after: int = 0) -> bytes:
    """A GIF whose screen is small x small but whose second frame is ``big`` (then
    ``small_after`` small frames): Pillow grows the canvas only when it seeks to that frame,
    long after the header was checked."""
    head_a, blocks_a = gif_blocks(_encode(Image.new("P", (small, small), 0), "GIF"))
    big_image = Image.new("P", big, 1)
    big_image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    head_b, blocks_b = gif_blocks(_encode(big_image, "GIF"))
    descriptor = bytearray(blocks_b[-1])
    descriptor[9] = 0x80 | (head_b[10] & 7)  # the big frame's palette becomes a local one
    frame_b = bytes(descriptor[:10]) + head_b[13:] + bytes(descriptor[10:])
    small_frame = blocks_a[-1]
    return head_a + b"".join(blocks_a) + frame_b + small_frame * small_after + b"\x3b"


@RELIABILITY
def test_format_is_sniffed_not_taken_from_the_name(tmp_path: Path, observe: Observe) -> None:
    """PNG bytes named .jpg, JPEG bytes named .gif: each decodes to exactly the pixels its own
    format holds (what Pillow reads from the bytes alone), whatever the name says."""
    photo, seen = _photo(64, 48), []
    for name, fmt in (("photo.jpg", "PNG"), ("photo.gif", "JPEG")):
        data = _write(tmp_path, name, _encode(photo, fmt)).read_bytes()
        result, _ = _attempt(data)
        with Image.open(io.BytesIO(data)) as stored:
            reference = _pixels(stored)
        error = -1.0  # the frames' mean distance from the bytes' own pixels; -1: none decoded
        if isinstance(result, DecodedImage):
            error = float(np.abs(_pixels(result.frames[0]) - reference).mean())
        seen.append((name, fmt, result, error))
    observe(
        "image.wrong_extension",
        "; ".join(
            f"{fmt} bytes named {name}: {_said(result)}, {error:.2f} levels from its own pixels"
            for name, fmt, result, error in seen
        ),
        sent=len(seen),
        received=len(seen),
    )
    for name, fmt, result, error in seen:
        assert isinstance(result, DecodedImage), name
        assert result.format == fmt, name
        assert error == 0.0, name


def test_later_gif_frame_cannot_grow_past_the_pixel_cap(tmp_path: Path) -> None:
    data = _write(tmp_path, "grows.gif", _growing_gif(16, (800, 600))).read_bytes()
    with Image.open(io.BytesIO(data)) as header:
        assert header.size == (16, 16) and header.n_frames == 2
    # 800 x 600 = 480 000 pixels may never be decoded under a 100 000-pixel cap.
    with pytest.raises(TooManyPixels):
        decode(data, DecodeLimits(max_pixels=100_000))


def test_unsampled_gif_frame_cannot_grow_past_the_pixel_cap(tmp_path: Path) -> None:
    """The big frame is not one of the sampled frames (only the first and the last are), so
    decode() seeks past it: the cap must hold for every frame it steps through, before that
    frame's pixels are decoded. Measured in a fresh process: peak memory is process-wide, and
    the child's own peak (VmHWM), since ru_maxrss of a vfork'd child starts at its parent's."""
    path = _write(tmp_path, "grows-early.gif", _growing_gif(16, (5000, 5000), small_after=8))
    with Image.open(path) as header:
        assert header.size == (16, 16) and header.n_frames == 10
    assert sample_indices(10, 2) == [0, 9]
    limits = DecodeLimits(max_pixels=100_000, sample_frames=2)
    run = measure(path.read_bytes(), tmp_path / "measure", limits)
    assert run.failure is None, run.output
    assert run.summary["outcome"] == "too_many_pixels"
    # 25 million pixels decoded would take hundreds of MiB; refused from the frame header, ~0.
    assert run.summary["rss_growth_mib"] < 64, run.summary


def _sparse_webp(canvas: tuple[int, int], frames: int = 4) -> bytes:
    """An animated WEBP of ``frames`` 16x12 frames on the ``canvas`` its VP8X header declares:
    a few hundred bytes that libwebp expands to the whole canvas for every frame it decodes
    (how the fuzzer's 342-byte inputs in build/fuzz/slow-webp-*.bin took 1.1 GiB)."""
    tiles = [Image.new("RGB", (16, 12), (60 * i, 90, 30)) for i in range(4)]
    data = _encode(tiles[0], "WEBP", save_all=True, append_images=tiles[1:])
    chunks, at = [], 12
    while at + 8 <= len(data):
        size = struct.unpack_from("<I", data, at + 4)[0]
        chunks.append(data[at : at + 8 + size + (size & 1)])
        at += 8 + size + (size & 1)
    vp8x, anim = (bytearray(c) for c in chunks if c[:4] in (b"VP8X", b"ANIM"))
    vp8x[12:15] = (canvas[0] - 1).to_bytes(3, "little")
    vp8x[15:18] = (canvas[1] - 1).to_bytes(3, "little")
    anmf = [c for c in chunks if c[:4] == b"ANMF"]
    body = bytes(vp8x + anim) + b"".join(anmf[i % len(anmf)] for i in range(frames))
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def test_sampled_frames_share_the_pixel_cap() -> None:
    """Every sampled frame is kept as RGB until the model has seen it, so the cap is on all of
    them together: at most ``max_pixels`` pixels held for one image, however it is animated."""
    frames = [Image.new("RGB", (40, 30), (60 * i, 0, 0)) for i in range(4)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert len(decode(data, DecodeLimits(max_pixels=4 * 40 * 30)).frames) == 4
    with pytest.raises(TooManyPixels, match="sampled"):
        decode(data, DecodeLimits(max_pixels=4 * 40 * 30 - 1))


def test_a_grown_gif_frame_counts_against_the_shared_cap() -> None:
    """The header's 16x16 screen fits twice over; the second frame grows the canvas to
    300x300, under the cap alone but over it with the first frame."""
    data = _growing_gif(16, (300, 300))
    assert len(decode(data, DecodeLimits(max_pixels=16 * 16 + 300 * 300)).frames) == 2
    with pytest.raises(TooManyPixels, match="sampled"):
        decode(data, DecodeLimits(max_pixels=300 * 300))


@pytest.mark.parametrize("canvas", [(16, 2_097_164), (2_949_136, 12)], ids=["tall", "wide"])
def test_sparse_animated_webp_is_refused_from_its_header(
    tmp_path: Path, canvas: tuple[int, int]
) -> None:
    """The fuzzer's inputs, at the shipped limits, in a fresh process under the harness's
    address-space cap: each frame is under the pixel cap (33.5 and 35.4 Mpx) but the four
    sampled frames are not, together; decoding them took 1.1 GiB and 2-6 s."""
    data = _sparse_webp(canvas)
    assert len(data) < 400
    run = measure(data, tmp_path / "measure", LIMITS)
    assert run.failure is None, run.output
    assert run.summary["outcome"] == "too_many_pixels", run.summary
    assert run.summary["seconds"] < 0.5, run.summary
    assert run.summary["rss_growth_mib"] < 16, run.summary


@pytest.mark.parametrize("into", [5, 10])
def test_animated_gif_with_a_torn_second_frame(tmp_path: Path, into: int) -> None:
    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(4)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    _, blocks = gif_blocks(data)
    # Cut inside (5) or just after (10) the second frame's image descriptor: Pillow fails
    # while finding out whether the image is animated at all.
    descriptors = [i for i, block in enumerate(blocks) if block[0] == 0x2C]
    cut = data.index(blocks[descriptors[1]]) + into
    torn = _write(tmp_path, "torn.gif", data[:cut]).read_bytes()
    with pytest.raises(ModqError):
        decode(torn, LIMITS)


def test_multipage_tiff_with_a_page_missing_its_width(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (20, 10), (1, 2, 3)), Image.new("RGB", (20, 10), (9, 9, 9))
    data = bytearray(_encode(first, "TIFF", save_all=True, append_images=[second]))
    assert data[:2] == b"II"
    first_ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first_ifd)[0]
    second_ifd = struct.unpack_from("<I", data, first_ifd + 2 + 12 * entries)[0]
    for i in range(struct.unpack_from("<H", data, second_ifd)[0]):
        entry = second_ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 256:  # ImageWidth
            struct.pack_into("<H", data, entry, 0xC000)  # renamed to a private tag
    path = _write(tmp_path, "pages.tif", bytes(data))
    with Image.open(path) as check:
        assert check.size == (20, 10)  # the first page is fine
    # Pillow fails with TypeError("Missing dimensions") while counting the pages.
    with pytest.raises(ModqError):
        decode(path.read_bytes(), LIMITS)


# --- what the corpus holds ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_every_corpus_file_decodes_to_rgb_frames(corpus: list[Path]) -> None:
    assert len(corpus) >= 10
    for path in corpus:
        decoded = decode(path.read_bytes(), LIMITS)
        assert decoded.frames, path.name
        assert 1 <= len(decoded.frames) <= LIMITS.sample_frames, path.name
        assert decoded.frame_count >= len(decoded.frames), path.name
        for frame in decoded.frames:
            assert frame.mode == "RGB", path.name
            assert min(frame.size) >= 1, path.name
            np.asarray(frame)  # really decoded


@pytest.fixture(scope="module")
def named(corpus: list[Path]) -> dict[str, Path]:
    return {path.name: path for path in corpus}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize(
    ("name", "turn"),
    [
        ("exif-rotated-6.jpg", Image.Transpose.ROTATE_270),  # 90 degrees clockwise
        ("exif-rotated-3.jpg", Image.Transpose.ROTATE_180),
    ],
)
def test_corpus_exif_rotations_are_applied(
    named: dict[str, Path], name: str, turn: Image.Transpose
) -> None:
    with Image.open(named[name]) as stored:
        stored_pixels = _pixels(stored)
        turned = _pixels(stored.transpose(turn))
    frame = decode(named[name].read_bytes(), LIMITS).frames[0]
    assert frame.size == (turned.shape[1], turned.shape[0])
    assert np.abs(_pixels(frame) - turned).mean() < 1.0  # shown the way a viewer shows it
    if stored_pixels.shape == turned.shape:
        assert np.abs(_pixels(frame) - stored_pixels).mean() > 10  # and not as stored


@RELIABILITY
def test_corpus_16_bit_png_matches_its_8_bit_twin(named: dict[str, Path], observe: Observe) -> None:
    with Image.open(named["grey16.png"]) as check:
        mode, size = check.mode, check.size
        stored = np.asarray(check, dtype=np.float64)
    assert mode.startswith("I;16")
    deep = _pixels(decode(named["grey16.png"].read_bytes(), LIMITS).frames[0])
    eight = _pixels(decode(named["grey.jpg"].read_bytes(), LIMITS).frames[0])
    difference = np.abs(deep - eight).mean()
    observe(
        "image.png16",
        f"{mode} {size[0]}x{size[1]} PNG (levels {stored.min():.0f} to {stored.max():.0f} of "
        f"65535) decoded to RGB with mean level {deep.mean():.1f}; its 8-bit JPEG twin "
        f"{eight.mean():.1f}, mean difference {difference:.2f}; clipped at 255 the mean would be "
        f"{np.minimum(stored, 255).mean():.1f}",
        sent=1,
        received=1,
    )
    assert deep.mean() < 250  # clipping would turn the photo white
    assert difference < 4  # the same picture as the 8-bit JPEG of it


def test_corpus_large_jpeg_draft(named: dict[str, Path]) -> None:
    data = named["large-4000x3000.jpg"].read_bytes()
    assert decode(data, LIMITS).frames[0].size == (4000, 3000)
    width, height = decode(data, LIMITS, draft_size=512).frames[0].size
    assert min(width, height) >= 512
    assert width <= 2000 and height <= 1500


@RELIABILITY
def test_corpus_cmyk_matches_the_rgb_original(named: dict[str, Path], observe: Observe) -> None:
    with Image.open(named["cmyk.jpg"]) as check, Image.open(named["photo-0.jpg"]) as rgb:
        mode, original = check.mode, _pixels(rgb)
    decoded = decode(named["cmyk.jpg"].read_bytes(), LIMITS)
    frame = _pixels(decoded.frames[0])
    difference = np.abs(frame - original).mean()
    observe(
        "image.cmyk_jpeg",
        f"{mode} JPEG {decoded.width}x{decoded.height} decoded to {decoded.frames[0].mode}; mean "
        f"difference from the RGB original {difference:.2f} levels (with inverted colours it "
        f"would be {np.abs(255 - frame - original).mean():.0f})",
        sent=1,
        received=1,
    )
    assert mode == "CMYK"
    assert decoded.frames[0].mode == "RGB"
    assert difference < 5  # colours not inverted


def test_corpus_animated_gif_samples_first_and_last(named: dict[str, Path]) -> None:
    path = named["animated.gif"]
    limits = DecodeLimits(sample_frames=3)
    decoded = decode(path.read_bytes(), limits)
    with Image.open(path) as gif:
        count = gif.n_frames
        reference = []
        for index in sample_indices(count, 3):
            gif.seek(index)
            reference.append(_pixels(gif))
    assert count > 3
    assert decoded.frame_count == count
    assert len(decoded.frames) == 3
    for frame, expected in zip(decoded.frames, reference, strict=True):
        assert np.abs(_pixels(frame) - expected).mean() < 1.0
    # First and last really differ, so the comparison above can tell frames apart.
    assert np.abs(reference[0] - reference[-1]).mean() > 5


def test_exif_orientation_6_is_transposed(tmp_path: Path) -> None:
    stored = Image.new("RGB", (300, 200), (20, 20, 200))
    stored.paste((230, 10, 10), (0, 0, 60, 40))  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _write(tmp_path, "rotated.jpg", _encode(stored, "JPEG", exif=exif, quality=95))
    decoded = decode(path.read_bytes(), LIMITS)
    frame = decoded.frames[0]
    assert frame.size == (200, 300)  # width and height swapped against the stored image
    # Turned clockwise, the stored top-left corner ends up top-right.
    top_right = np.asarray(frame.crop((170, 0, 200, 30))).mean(axis=(0, 1))
    top_left = np.asarray(frame.crop((0, 0, 30, 30))).mean(axis=(0, 1))
    assert top_right[0] > 180 > top_right[2]
    assert top_left[2] > 150 > top_left[0]


@pytest.mark.parametrize("frame_count", [2, 5, 30])
def test_animated_gif_yields_sampled_frames(tmp_path: Path, frame_count: int) -> None:
    # Each frame its own grey level, so every decoded frame tells which source frame it is.
    levels = [round(i * 250 / (frame_count - 1)) for i in range(frame_count)]
    frames = [Image.new("RGB", (40, 30), (v, v, v)) for v in levels]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    path = _write(tmp_path, "anim.gif", data)
    limits = DecodeLimits(sample_frames=8)
    decoded = decode(path.read_bytes(), limits)
    assert decoded.format == "GIF"
    assert decoded.frame_count == frame_count
    wanted = sample_indices(frame_count, limits.sample_frames)
    assert wanted[0] == 0 and wanted[-1] == frame_count - 1
    assert len(decoded.frames) == len(wanted) == min(frame_count, 8)
    got = [int(np.asarray(f)[..., 0].mean().round()) for f in decoded.frames]
    assert got == [levels[i] for i in wanted]


@pytest.mark.parametrize(("count", "wanted"), [(1, 8), (8, 8), (9, 8), (100, 8), (1000, 3), (7, 1)])
def test_sample_indices(count: int, wanted: int) -> None:
    indices = sample_indices(count, wanted)
    assert indices == sorted(set(indices))
    assert len(indices) == min(count, wanted)
    assert indices[0] == 0
    if wanted > 1:
        assert indices[-1] == count - 1
    assert all(0 <= i < count for i in indices)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    # A 16-bit greyscale "photo": values spread over the whole 16-bit range, mid-grey on average.
    y, x = np.mgrid[0:200, 0:300]
    wide = ((x * 7 + y * 13) % 300) / 299 * 60_000 + 2_000
    image = Image.fromarray(wide.astype(np.uint16))
    path = _write(tmp_path, "deep.png", _encode(image, "PNG"))
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # it really is stored as 16-bit
    decoded = decode(path.read_bytes(), LIMITS)
    pixels = np.asarray(decoded.frames[0]).astype(np.float64)
    assert decoded.frames[0].mode == "RGB"
    assert 60 < pixels.mean() < 200  # clipping at 255 would give a nearly white image
    expected = (wide.astype(np.int64) >> 8).astype(np.float64)
    assert np.abs(pixels[..., 0] - expected).max() <= 1
    assert pixels.std() > 30  # the detail survives


def test_16_bit_png_is_narrowed_without_wide_copies() -> None:
    """At the pixel cap a 16-bit PNG must not need a GiB on top of its pixels: int64 copies
    cost 16 bytes a pixel. tracemalloc sees numpy's buffers (not Pillow's), which is where
    the narrowing happens."""
    height, width = 1000, 2000
    wide = (np.arange(height * width, dtype=np.uint32) * 37 % 65536).astype(np.uint16)
    data = _encode(Image.fromarray(wide.reshape(height, width)), "PNG", compress_level=1)
    decode(data, LIMITS)  # warm-up: first-call caches are not the decode's
    tracemalloc.start()
    try:
        frame = decode(data, LIMITS).frames[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(frame)[..., 0].ravel(), (wide >> 8).astype(np.uint8))
    # The uint16 pixels (2 bytes) and their shifted copy (2), then the 8-bit result (1).
    assert peak < 6 * width * height, f"{peak / (width * height):.1f} bytes a pixel"


@pytest.mark.parametrize("seam", ["header", "frames"])
def test_memory_error_is_not_a_corrupt_image(monkeypatch: pytest.MonkeyPatch, seam: str) -> None:
    """Running out of memory says nothing about the image: as ``corrupt_image`` a valid upload
    would be refused for good. It is ``resource_exhausted``, which the worker retries."""
    data = _encode(_photo(32, 24), "PNG")

    def exhausted(*args: object, **kwargs: object) -> Image.Image:
        raise MemoryError

    if seam == "header":
        monkeypatch.setattr(Image, "open", exhausted)
    else:
        monkeypatch.setattr("worker.decode._to_rgb", exhausted)
    with pytest.raises(ResourceExhausted) as info:
        decode(data, LIMITS)
    assert info.value.code == "resource_exhausted" and info.value.retryable
    assert isinstance(info.value.__cause__, MemoryError)


def test_draft_size_shrinks_large_jpeg(tmp_path: Path) -> None:
    large = _photo(500, 375).resize((4000, 3000), Image.Resampling.BILINEAR)
    path = _write(tmp_path, "large.jpg", _encode(large, "JPEG", quality=80))
    data = path.read_bytes()
    full = decode(data, LIMITS)
    assert full.frames[0].size == (4000, 3000)
    draft = 512
    small = decode(data, LIMITS, draft_size=draft)
    width, height = small.frames[0].size
    assert width >= draft and height >= draft
    assert width <= 4000 // 2 and height <= 3000 // 2
    assert small.frames[0].mode == "RGB"
    # Both see the same picture.
    thumb_full = np.asarray(full.frames[0].resize((64, 48)), dtype=np.float64)
    thumb_small = np.asarray(small.frames[0].resize((64, 48)), dtype=np.float64)
    assert np.abs(thumb_full - thumb_small).mean() < 10


def test_draft_size_never_goes_below_the_request(tmp_path: Path) -> None:
    path = _write(tmp_path, "med.jpg", _encode(_photo(900, 700), "JPEG"))
    width, height = decode(path.read_bytes(), LIMITS, draft_size=512).frames[0].size
    assert width >= 512 and height >= 512


def test_draft_ignored_for_png(tmp_path: Path) -> None:
    path = _write(tmp_path, "big.png", _encode(_photo(800, 600), "PNG"))
    assert decode(path.read_bytes(), LIMITS, draft_size=128).frames[0].size == (800, 600)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (80, 60), (0, 255, 255, 0))  # pure red in CMYK
    path = _write(tmp_path, "cmyk.jpg", _encode(cmyk, "JPEG", quality=95))
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    frame = decode(path.read_bytes(), LIMITS).frames[0]
    assert frame.mode == "RGB"
    r, g, b = np.asarray(frame).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_mpo_scores_only_its_primary_image(tmp_path: Path) -> None:
    primary = Image.new("RGB", (90, 60), (220, 0, 0))
    preview = Image.new("RGB", (90, 60), (0, 0, 220))
    data = _encode(primary, "MPO", save_all=True, append_images=[preview])
    decoded = decode(_write(tmp_path, "phone.jpg", data).read_bytes(), LIMITS, draft_size=64)
    assert decoded.format == "MPO"
    assert len(decoded.frames) == 1
    r, _, b = np.asarray(decoded.frames[0]).reshape(-1, 3).mean(axis=0)
    assert r > 180 > b


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "L", "I", "F"])
def test_unusual_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    image = _photo(50, 40).convert("L" if mode in ("I", "F") else mode).convert(mode)
    fmt = "TIFF" if mode in ("I", "F") else "PNG"
    path = _write(tmp_path, f"mode.{fmt.lower()}", _encode(image, fmt))
    frame = decode(path.read_bytes(), LIMITS).frames[0]
    assert frame.mode == "RGB"
    assert frame.size == (50, 40)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_decode(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path, f"x.{fmt.lower()}", _encode(_photo(64, 48), fmt))
    decoded = decode(path.read_bytes(), LIMITS)
    assert decoded.format == fmt
    assert decoded.frames[0].size == (64, 48)


@pytest.mark.parametrize(("fmt", "params"), [("ICO", {}), ("PCX", {}), ("TGA", {}), ("PPM", {})])
def test_formats_off_the_allowlist_are_refused(
    tmp_path: Path, fmt: str, params: dict[str, object]
) -> None:
    data = _encode(_photo(32, 32), fmt, **params)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow could read it …
    with pytest.raises(UnsupportedFormat):  # … modq will not
        decode(_write(tmp_path, f"x.{fmt.lower()}", data).read_bytes(), LIMITS)


# --- property: decode never raises outside the ModqError tree ----------------------------------


def _decode_contract(data: bytes, draft: int | None) -> None:
    """decode() returns RGB frames within the limits or raises a ModqError: nothing else.
    Pillow's warnings about odd metadata are not errors (outside pytest they are only logged),
    so they are silenced here; the contract is about what decode() raises and returns. The
    same contract, run in a capped process for a time budget: tests/unit/test_decode_fuzz.py."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoded = decode(data, FUZZ_LIMITS, draft)
        except ModqError:
            return
    check_decoded(decoded, FUZZ_LIMITS)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=4096), draft=st.sampled_from([None, 64, 512]))
def test_decode_arbitrary_bytes(data: bytes, draft: int | None) -> None:
    _decode_contract(data, draft)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seed_images())))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=_mutated(), draft=st.sampled_from([None, 64]))
def test_decode_mutated_images(data: bytes, draft: int | None) -> None:
    _decode_contract(data, draft)
