"""What a backend's forward pass receives through the pipeline: its own preprocessing of the
decoded frames, whether a decoder made the input (a Pillow fit, normalised here) or the backend
preprocessed the frame itself (a backend with its own ``preprocess``, or torchvision's fit)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.support.images import textured
from worker.decode import DecodeLimits, decode
from worker.decode.pool import Backstop, DecodePool
from worker.models.backend import Backend, BatchOutput
from worker.models.fake import FAKE_CARD
from worker.models.preprocess import draft_size
from worker.pipeline import Pipeline, PipelineOptions
from worker.policy import Policy
from worker.storage import MemoryStore

#: a squash model's card (Pillow fit, normalised with a mean and a spread)
CARD = FAKE_CARD


class Recording(Backend):
    """Keeps every batch it is given; scores 0.5."""

    card = CARD

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        self.batches.append(batch.copy())
        probabilities = np.full((len(batch), 2), 0.5, dtype=np.float32)
        return BatchOutput(probabilities, None)


class OwnLayout(Recording):
    """A backend with preprocessing of its own (HWC, no normalisation): it must get it."""

    def preprocess(self, image: Image.Image) -> np.ndarray:
        resized = image.convert("RGB").resize((32, 32), Image.Resampling.NEAREST)
        return np.asarray(resized, np.float32)


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    textured(7, max(size)).resize(size).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("in_pool", [False, True], ids=["in-process", "decode-pool"])
@pytest.mark.parametrize("backend_type", [Recording, OwnLayout])
def test_the_forward_pass_gets_the_backends_preprocessing_of_the_frame(
    backend_type: type[Recording], in_pool: bool
) -> None:
    backend = backend_type()
    assert (backend.fit is None) is (backend_type is OwnLayout)
    data = _jpeg((900, 600))
    limits = DecodeLimits()
    frame = decode(data, limits, draft_size(CARD)).frames[0]
    want = backend.preprocess(frame)
    with DecodePool(Backstop(1)) as pool:
        options = PipelineOptions(
            limits=limits, max_wait_ms=1, **({"decoder": pool.prepare} if in_pool else {})
        )
        store = MemoryStore({"mem://a.jpg": data})
        with Pipeline(backend, store, Policy("p", 0.3, 0.9), options=options) as pipeline:
            result = pipeline.process("mem://a.jpg")
    assert result.error is None, result.error
    [batch] = backend.batches
    assert batch.shape == (1, *want.shape)
    assert batch[0].tobytes() == want.tobytes()
