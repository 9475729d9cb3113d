"""The decode backstop (worker.decode.pool): decoder processes with CPU-time and memory limits.

Real images that a structural walk lets through (they are well-formed and within the pixel
cap) but that need more than the limits set here; decoders killed from outside; decoders
that lie (tests.support.lying_decoder); and frames equal, byte for byte, to in-process ones.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.support.corpus import EXAMPLES, build_corpus, hostile_samples
from tests.support.lying_decoder import LIES, PREPARED
from worker.config import Settings
from worker.decode import DecodedImage, DecodeLimits, decode
from worker.decode.fit import Fit
from worker.decode.pool import Backstop, DecodePool, InProcessDecoder, build_decoder
from worker.decode.prepare import Prepared, Recipe, decode_prepared
from worker.decode.proc import cpu_seconds
from worker.errors import (
    ConfigError,
    CorruptImage,
    DecodeBudgetExceeded,
    DecoderCrashed,
    ModqError,
    ResourceExhausted,
)

LIMITS = DecodeLimits()
DRAFT = 448


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def heavy_png() -> bytes:
    """25 Mpx of RGBA in under 1 MB: a well-formed PNG, half the pixel cap, whose decode takes
    ~200 MB and a good fraction of a CPU second."""
    return _png(Image.new("RGBA", (5000, 5000), (200, 40, 90, 255)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("corpus")
    return [*build_corpus(folder), *sorted(EXAMPLES.glob("*.jpg"))]


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    with DecodePool(Backstop(2)) as decoders:
        yield decoders


def _liar(lie: str, **limits: float) -> DecodePool:
    command = (sys.executable, "-m", "tests.support.lying_decoder", lie)
    return DecodePool(Backstop(1, **limits), command)  # type: ignore[arg-type]


def _same(got: DecodedImage, want: DecodedImage) -> None:
    assert (got.format, got.width, got.height, got.frame_count) == (
        want.format,
        want.width,
        want.height,
        want.frame_count,
    )
    assert len(got.frames) == len(want.frames)
    for ours, theirs in zip(got.frames, want.frames, strict=True):
        assert ours.mode == theirs.mode == "RGB"
        assert ours.size == theirs.size
        assert ours.tobytes() == theirs.tobytes()


def _outcome(call: object, data: bytes, draft: int | None) -> DecodedImage | str:
    try:
        return call(data, LIMITS, draft)  # type: ignore[operator, no-any-return]
    except ModqError as exc:
        return exc.code


# --- what comes back is what decode gives ---------------------------------------------------


@pytest.mark.parametrize("draft", [DRAFT, None])
def test_frames_from_the_pool_equal_in_process_frames_byte_for_byte(
    pool: DecodePool, corpus: list[Path], draft: int | None
) -> None:
    animated = 0
    for path in corpus:
        data = path.read_bytes()
        want = decode(data, LIMITS, draft)
        _same(pool.decode(data, LIMITS, draft), want)
        animated += want.frame_count > 1
    assert animated, "the corpus lost its animation"


#: what the pipeline asks of a decoder for each kind of model (worker.scores), and for banks
RECIPES = [
    Recipe(Fit("caffe", 224), frames=False, reduced=True),
    Recipe(Fit("center", 384, "bicubic"), frames=False, reduced=True),
    Recipe(Fit("squash", 224, "bilinear"), frames=True, reduced=True),
    Recipe(None, frames=True, reduced=True),  # a model whose fitting is torchvision's
]


def _same_prepared(got: Prepared, want: Prepared) -> None:
    assert (got.format, got.width, got.height, got.frame_count, got.sizes) == (
        want.format,
        want.width,
        want.height,
        want.frame_count,
        want.sizes,
    )
    for ours, theirs in [
        *zip(got.frames, want.frames, strict=True),
        *zip(got.inputs, want.inputs, strict=True),
        *([(got.reduced, want.reduced)] if want.reduced or got.reduced else []),
    ]:
        assert ours is not None and theirs is not None
        assert (ours.mode, ours.size) == (theirs.mode, theirs.size)
        assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.fit.crop if r.fit else "frames")
def test_what_the_pool_prepares_equals_in_process_preparation_byte_for_byte(
    pool: DecodePool, corpus: list[Path], recipe: Recipe
) -> None:
    """Model inputs, hash reductions and kept frames cross the pipe unchanged, for stills,
    animations (an input per sampled frame), rotated, grey, 16-bit and palette images."""
    several = 0
    for path in corpus:
        data = path.read_bytes()
        want = decode_prepared(data, LIMITS, DRAFT, recipe)
        got = pool.prepare(data, LIMITS, DRAFT, recipe)
        _same_prepared(got, want)
        assert bool(got.frames) is recipe.frames
        assert len(got.inputs) == (len(got.sizes) if recipe.fit else 0)
        if recipe.fit:
            assert {x.size for x in got.inputs} == {(recipe.fit.input_size,) * 2}
        several += len(got.sizes) > 1
    assert several, "the corpus lost its animation"


def test_refusals_are_the_in_process_refusals(pool: DecodePool) -> None:
    for name, data in hostile_samples().items():
        want, got = _outcome(decode, data, DRAFT), _outcome(pool.decode, data, DRAFT)
        if isinstance(want, str):
            assert got == want, name
        else:
            assert isinstance(got, DecodedImage), (name, got)
            _same(got, want)


def test_sixteen_threads_share_two_decoders(pool: DecodePool, corpus: list[Path]) -> None:
    contents = [path.read_bytes() for path in corpus]
    wanted = [decode(data, LIMITS, DRAFT) for data in contents]
    pids = pool.pids()

    each = 8

    def work(offset: int) -> int:
        for i in range(each):
            index = (i + 2 * offset) % len(contents)
            _same(pool.decode(contents[index], LIMITS, DRAFT), wanted[index])
        return each

    with ThreadPoolExecutor(16) as threads:
        done = sum(threads.map(work, range(16)))
    assert done == 16 * each
    assert pool.pids() == pids, "a decoder was replaced while every decode was ordinary"


# --- the budget: CPU time ---------------------------------------------------------------------


def test_a_real_image_over_the_cpu_budget_is_refused_in_bounded_time(heavy_png: bytes) -> None:
    started = time.process_time()
    decode(heavy_png, LIMITS, None)
    needs = time.process_time() - started
    budget = 0.1
    assert needs > 2 * budget, f"the image decodes in {needs:.2f} s: too light for this test"
    with DecodePool(Backstop(1, cpu_s=budget)) as pool:
        [pid] = pool.pids()
        started = time.monotonic()
        with pytest.raises(DecodeBudgetExceeded, match="CPU time"):
            pool.decode(heavy_png, LIMITS, None)
        waited = time.monotonic() - started
        assert waited < budget + 2.0, waited
        _same(pool.decode(_small(), LIMITS, DRAFT), decode(_small(), LIMITS, DRAFT))
        assert pool.pids() != [pid], "the killed decoder was not replaced"


def _small() -> bytes:
    return (EXAMPLES / "astronaut.jpg").read_bytes()


def test_a_decoder_spinning_past_its_cpu_budget_is_killed() -> None:
    with _liar("spin", cpu_s=0.3) as pool:
        started = time.monotonic()
        with pytest.raises(DecodeBudgetExceeded, match="CPU time") as caught:
            pool.decode(_small(), LIMITS, DRAFT)
        assert time.monotonic() - started < 0.3 + 2.0
        assert not caught.value.retryable


def test_a_stalled_decoder_is_judged_by_wall_time_and_may_be_retried() -> None:
    """No CPU spent, no answer: the machine, not the image, so the error is retryable."""
    with _liar("stall", cpu_s=0.2, wall_s=1.5) as pool:
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="wall time") as caught:
            pool.decode(_small(), LIMITS, DRAFT)
        waited = time.monotonic() - started
        assert 1.5 <= waited < 1.5 + 2.0, waited
        assert caught.value.retryable


# --- the budget: memory -----------------------------------------------------------------------


def test_a_real_image_over_the_memory_budget_is_refused(heavy_png: bytes) -> None:
    with DecodePool(Backstop(1, memory_mb=64)) as pool:
        [pid] = pool.pids()
        with pytest.raises(DecodeBudgetExceeded, match="memory") as caught:
            pool.decode(heavy_png, LIMITS, None)
        assert caught.value.code == "decode_budget_exceeded" and not caught.value.retryable
        assert pool.pids() != [pid], "a decoder that ran out of memory was kept"
        # An ordinary photo fits in 64 MB: the replacement serves it.
        _same(pool.decode(_small(), LIMITS, DRAFT), decode(_small(), LIMITS, DRAFT))


def test_only_a_fresh_decoder_may_refuse_an_image_for_memory(
    heavy_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a decoder kept from earlier images must not turn into a permanent refusal: a
    used decoder that runs out of memory is replaced and the image tried once more."""
    spawned: list[int] = []
    spawn = DecodePool._spawn

    def counting(pool: DecodePool) -> object:
        child = spawn(pool)
        spawned.append(child.pid)
        return child

    monkeypatch.setattr(DecodePool, "_spawn", counting)
    with DecodePool(Backstop(1, memory_mb=64)) as pool:
        assert len(spawned) == 1
        with pytest.raises(DecodeBudgetExceeded, match="memory"):
            pool.decode(heavy_png, LIMITS, None)  # a fresh decoder: refused, replaced once
        assert len(spawned) == 2
        pool.decode(_small(), LIMITS, DRAFT)
        with pytest.raises(DecodeBudgetExceeded, match="memory"):
            pool.decode(heavy_png, LIMITS, None)  # a used one: asked again in a fresh one
        assert len(spawned) == 4
        assert pool.pids() == [spawned[-1]]


def test_the_default_budget_decodes_an_image_at_the_pixel_cap() -> None:
    """7000 x 7000 RGBA (49 Mpx, the cap is 50 M), decoded at full size: the defaults must
    not refuse what decode's own limits accept."""
    data = _png(Image.new("RGBA", (7000, 7000), (10, 200, 30, 128)))
    with DecodePool(Backstop(1)) as pool:
        got = pool.decode(data, LIMITS, None)
    _same(got, decode(data, LIMITS, None))


# --- decoders that die ------------------------------------------------------------------------


def test_a_decoder_killed_mid_decode_gives_a_retryable_error_and_is_replaced(
    heavy_png: bytes,
) -> None:
    with DecodePool(Backstop(1, cpu_s=60)) as pool:
        [pid] = pool.pids()
        idle_cpu = cpu_seconds(pid)
        assert idle_cpu is not None
        outcome: list[object] = []
        caller = threading.Thread(
            target=lambda: outcome.append(_outcome(pool.decode, heavy_png, None))
        )
        caller.start()
        deadline = time.monotonic() + 30
        while (cpu_seconds(pid) or 0) < idle_cpu + 0.05 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)  # mid-decode, as the OOM killer would
        caller.join(30)
        assert outcome == [ResourceExhausted.code]
        _same(pool.decode(_small(), LIMITS, DRAFT), decode(_small(), LIMITS, DRAFT))
        [replacement] = pool.pids()
        assert replacement != pid


def test_a_decoder_ignores_sigterm_so_a_warm_shutdown_finishes_its_decode(
    pool: DecodePool,
) -> None:
    pids = pool.pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    _same(pool.decode(_small(), LIMITS, DRAFT), decode(_small(), LIMITS, DRAFT))
    assert pool.pids() == pids


def test_a_native_crash_is_permanent() -> None:
    with _liar("segv") as pool:
        with pytest.raises(DecoderCrashed, match="SIGSEGV") as caught:
            pool.decode(_small(), LIMITS, DRAFT)
        assert not caught.value.retryable
        # the next image meets a fresh decoder (which crashes again), not a hang
        with pytest.raises(DecoderCrashed):
            pool.decode(_small(), LIMITS, DRAFT)


# --- decoders that lie ------------------------------------------------------------------------


@pytest.mark.parametrize("lie", [name for name, answer in LIES.items() if answer is not None])
def test_an_answer_out_of_protocol_is_refused_and_its_decoder_replaced(lie: str) -> None:
    with _liar(lie) as pool:
        [pid] = pool.pids()
        tracemalloc.start()
        try:
            with pytest.raises(DecoderCrashed) as caught:
                pool.decode(_small(), LIMITS, DRAFT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not caught.value.retryable
        # nothing the liar announced was allocated on its word
        assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated for a lie"
        assert pool.pids() != [pid]


PREPARE = Recipe(Fit("caffe", 224), frames=False, reduced=True)


def test_an_honest_prepared_answer_is_taken() -> None:
    """The control for the lies below: the same answer, told straight, is accepted."""
    with _liar("honest") as pool:
        got = pool.prepare(_small(), LIMITS, DRAFT, PREPARE)
    assert got.sizes == ((10, 10),) and not got.frames
    assert [x.size for x in got.inputs] == [(224, 224)]
    assert got.reduced is not None and got.reduced.size == (10, 10)


@pytest.mark.parametrize("lie", [name for name in PREPARED if name != "honest"])
def test_a_prepared_answer_that_is_not_what_was_asked_is_refused(lie: str) -> None:
    with _liar(lie) as pool:
        [pid] = pool.pids()
        tracemalloc.start()
        try:
            with pytest.raises(DecoderCrashed):
                pool.prepare(_small(), LIMITS, DRAFT, PREPARE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated for a lie"
        assert pool.pids() != [pid]


def test_a_decoder_that_announces_itself_wrongly_stops_the_pool_from_starting() -> None:
    with pytest.raises(ConfigError, match="did not start"):
        _liar("bad_ready")


def test_a_decoder_sees_neither_settings_nor_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODQ_WEBHOOK_SECRET", "hmac-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-key")
    with _liar("env") as pool, pytest.raises(CorruptImage) as caught:
        pool.decode(_small(), LIMITS, DRAFT)
    seen = str(caught.value)
    assert "OMP_NUM_THREADS" in seen
    assert "MODQ_WEBHOOK_SECRET" not in seen and "AWS_SECRET_ACCESS_KEY" not in seen


# --- life cycle -----------------------------------------------------------------------------


def test_a_closed_pool_refuses_work_and_leaves_no_decoder_behind() -> None:
    pool = DecodePool(Backstop(2))
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    with pytest.raises(ResourceExhausted, match="closed"):
        pool.decode(_small(), LIMITS, DRAFT)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_settings_choose_the_decoder() -> None:
    assert isinstance(build_decoder(Settings(decode_processes=0).decode), InProcessDecoder)
    pool = build_decoder(
        Settings(decode_processes=2, decode_cpu_s=1.5, decode_max_memory_mb=300).decode
    )
    try:
        assert isinstance(pool, DecodePool)
        assert pool.backstop == Backstop(2, 1.5, 300, 20.0)
        assert len(pool.pids()) == 2
    finally:
        pool.close()
    cores = len(os.sched_getaffinity(0))
    pool = build_decoder(Settings().decode)
    try:
        assert isinstance(pool, DecodePool) and len(pool.pids()) == cores
    finally:
        pool.close()


def test_each_models_inputs_through_the_pool_are_its_preprocessing_of_the_frames(
    pool: DecodePool, corpus: list[Path]
) -> None:
    """A fitted input from a decoder process, normalised here, is exactly what the model's
    own preprocessing makes of the frame decoded in this process: the same scores."""
    from tests.support.budget import preset_cards
    from worker.models.preprocess import draft_size, fit_of, normalize, preprocess

    fitted = set()
    for card in preset_cards():
        fit = fit_of(card)
        if fit is None:
            assert card.crop == "squash_tv"  # torchvision's resize: frames cross instead
            continue
        recipe = Recipe(fit, frames=False, reduced=True)
        for path in corpus[::3]:
            data = path.read_bytes()
            got = pool.prepare(data, LIMITS, draft_size(card), recipe)
            frames = decode(data, LIMITS, draft_size(card)).frames
            for ours, frame in zip(got.inputs, frames, strict=True):
                want = preprocess(card, frame)
                assert normalize(card, ours).tobytes() == want.tobytes(), (card.id, path)
        fitted.add(card.crop)
    assert fitted == {"caffe", "center", "squash"}, "a Pillow crop left the presets"


def test_the_reduction_size_the_worker_expects_is_the_one_a_decoder_makes() -> None:
    """The worker accepts exactly ``reduced_size`` of the first frame from a decoder: it must
    be what ``reduce_for_hashing`` gives, for sides that divide and sides that do not."""
    from worker.hashing import reduce_for_hashing, reduced_size

    for size in [(1, 1), (10, 7), (127, 300), (128, 128), (255, 256), (257, 1000), (1001, 3999)]:
        assert reduce_for_hashing(Image.new("RGB", size)).size == reduced_size(size), size
