"""worker.models.fake: the deterministic model the pipeline, service and batcher tests run on.

It must keep the real backends' interface (the pipeline runs on it unchanged), score an image
by its colour as documented, so a test can pick a score, and count what it ran.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from worker.cache import MemoryCache
from worker.messages import CacheOutcome, Status, Verdict
from worker.models.backend import Backend, BatchOutput, ModelOutput
from worker.models.fake import FAKE_CARD, FakeBackend, colour_for, image_with_score
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import load_policy
from worker.storage import MemoryStore


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def score(backend: Backend, image: Image.Image) -> float:
    [output] = backend.predict([image])
    return output.scores.nsfw_score


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


# --- the interface of a real backend -----------------------------------------------------------


def test_it_is_a_backend_with_a_card_like_a_real_one(fake: FakeBackend) -> None:
    assert isinstance(fake, Backend)
    assert fake.card is FAKE_CARD
    assert fake.card.labels == ("sfw", "nsfw") and fake.card.unsafe_labels == ("nsfw",)
    assert fake.card.cache_namespace == "modq/fake@1/pp1"
    assert (fake.precision, fake.device) == ("fp32", "cpu")
    assert fake.describe() == "modq/fake (fake, fp32, cpu)"
    assert fake.predict([]) == []


def test_preprocess_takes_the_squash_path_for_any_mode_and_shape(fake: FakeBackend) -> None:
    size = fake.card.input_size
    for image in (
        Image.new("RGB", (640, 17), (10, 20, 30)),
        Image.new("L", (5, 300), 200),
        Image.new("RGBA", (33, 33), (255, 0, 0, 0)),
        Image.new("P", (64, 48)),
    ):
        array = fake.preprocess(image)
        assert array.shape == (3, size, size) and array.dtype == np.float32
        assert -1.0 <= array.min() <= array.max() <= 1.0  # mean 0.5, std 0.5


def test_forward_then_postprocess_per_row(fake: FakeBackend) -> None:
    images = [image_with_score(s) for s in (0.1, 0.5, 0.9)]
    output = fake.forward(np.stack([fake.preprocess(i) for i in images]))
    assert isinstance(output, BatchOutput)
    assert output.probabilities.shape == (3, 2) and output.probabilities.dtype == np.float32
    assert output.embeddings is None
    np.testing.assert_allclose(output.probabilities.sum(axis=1), 1.0, atol=1e-6)
    rows = [fake.postprocess(output, i) for i in range(3)]
    assert all(isinstance(row, ModelOutput) and row.embedding is None for row in rows)
    assert [round(row.scores.nsfw_score, 2) for row in rows] == [0.1, 0.5, 0.9]
    assert rows[2].scores.probabilities["nsfw"] == rows[2].scores.nsfw_score


def test_a_batch_of_the_wrong_shape_is_refused(fake: FakeBackend) -> None:
    for shape in [(2, 3, 16, 16), (3, 32, 32), (1, 32, 32, 3)]:
        with pytest.raises(ValueError, match="expected"):
            fake.forward(np.zeros(shape, np.float32))
    assert fake.forward_calls == 0


def test_the_embedding_is_the_colour_means_and_spread(fake: FakeBackend) -> None:
    assert fake.card.embedding_dim == 4
    assert [out.embedding for out in fake.predict([Image.new("RGB", (8, 8))] * 2)] == [None, None]
    [red, flat] = fake.predict(
        [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 0))], embed=True
    )
    assert red.embedding is not None and flat.embedding is not None
    assert red.embedding.shape == (4,) and red.embedding.dtype == np.float32
    np.testing.assert_allclose(red.embedding[:3], [1.0, 0.0, 0.0], atol=1e-6)
    assert red.embedding[3] > 0.4  # one channel of three lit
    np.testing.assert_allclose(flat.embedding, [0.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_it_needs_neither_onnx_runtime_nor_torch() -> None:
    code = (
        "import sys\n"
        "from worker.models.fake import FakeBackend, image_with_score\n"
        "FakeBackend().predict([image_with_score(0.9)], embed=True)\n"
        "heavy = {'onnxruntime', 'onnx', 'torch', 'torchvision', 'timm', 'transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- a score chosen by colour ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("colour", "low", "high"),
    [
        ((255, 0, 0), 0.999, 1.0),  # pure red
        ((128, 128, 128), 0.5, 0.5),  # every grey: exactly 0.5
        ((0, 0, 0), 0.5, 0.5),
        ((255, 255, 255), 0.5, 0.5),
        ((0, 255, 0), 0.017, 0.019),  # pure green, or blue
        ((0, 0, 255), 0.017, 0.019),
        ((0, 255, 255), 0.0, 0.001),  # cyan
    ],
)
def test_the_documented_colours_score_as_documented(
    fake: FakeBackend, colour: tuple[int, int, int], low: float, high: float
) -> None:
    assert low <= score(fake, Image.new("RGB", (48, 40), colour)) <= high


@pytest.mark.parametrize("wanted", [0.003, 0.05, 0.2, 0.4999, 0.5, 0.8, 0.85, 0.95, 0.997])
def test_image_with_score_scores_what_was_asked(fake: FakeBackend, wanted: float) -> None:
    assert score(fake, image_with_score(wanted)) == pytest.approx(wanted, abs=0.01)


def test_colour_for_leans_red_above_half_and_refuses_impossible_scores() -> None:
    red, green, blue = colour_for(0.9)
    assert red > 128 > green == blue
    assert colour_for(0.5) == (128, 128, 128)
    for impossible in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            colour_for(impossible)


def test_scores_are_deterministic_and_independent_of_the_batch(fake: FakeBackend) -> None:
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(5)]
    alone = [score(fake, image) for image in images]
    together = [out.scores.nsfw_score for out in fake.predict(images)]
    again = [out.scores.nsfw_score for out in FakeBackend().predict(images)]
    assert alone == together == again
    assert len(set(alone)) == 5  # the pixels, not the batch position, decide


# --- counters ----------------------------------------------------------------------------------


def test_it_counts_forward_calls_and_batch_sizes(fake: FakeBackend) -> None:
    assert (fake.forward_calls, fake.batch_sizes, fake.images_scored) == (0, [], 0)
    fake.predict([image_with_score(0.2)] * 3)
    fake.predict([image_with_score(0.7)])
    assert (fake.forward_calls, fake.batch_sizes, fake.images_scored) == (2, [3, 1], 4)
    sizes = fake.batch_sizes
    sizes.append(99)  # a copy: the backend's own record is untouched
    assert fake.batch_sizes == [3, 1]
    fake.reset_counters()
    assert (fake.forward_calls, fake.batch_sizes, fake.images_scored) == (0, [], 0)


def test_counters_add_up_across_threads(fake: FakeBackend) -> None:
    batch = np.stack([fake.preprocess(image_with_score(0.3))] * 2)
    start = threading.Barrier(8)

    def run() -> None:
        start.wait()
        for _ in range(25):
            fake.forward(batch)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert fake.forward_calls == 200 and fake.images_scored == 400


# --- the pipeline runs on it unchanged ---------------------------------------------------------


def test_the_pipeline_scores_caches_and_decides_on_the_fake(fake: FakeBackend) -> None:
    objects = {
        "mem://red.png": encode(Image.new("RGB", (120, 80), (255, 0, 0))),
        "mem://grey.png": encode(Image.new("RGB", (80, 120), (128, 128, 128))),
        "mem://green.jpg": encode(Image.new("RGB", (64, 64), (0, 255, 0)), "JPEG"),
    }
    policy = load_policy("default", fake.card)
    cache = MemoryCache()

    def run() -> dict[str, tuple[Status, Verdict | None, CacheOutcome | None]]:
        options = PipelineOptions(max_wait_ms=5)
        with Pipeline(fake, MemoryStore(objects), policy, options=options, cache=cache) as p:
            results = list(p.process_many(objects, concurrency=2))
        return {
            r.image: (r.status, r.verdict, r.cache.outcome if r.cache else None) for r in results
        }

    first = run()
    assert first == {
        "mem://red.png": (Status.OK, Verdict.BLOCK, CacheOutcome.MISS),
        "mem://grey.png": (Status.OK, Verdict.REVIEW, CacheOutcome.MISS),
        "mem://green.jpg": (Status.OK, Verdict.ALLOW, CacheOutcome.MISS),
    }
    assert fake.images_scored == 3
    second = run()
    assert {image: outcome for image, (_, _, outcome) in second.items()} == dict.fromkeys(
        objects, CacheOutcome.EXACT
    )
    assert fake.images_scored == 3  # every answer came from the cache
