"""Precision `auto`, and the ONNX export it can pick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.models.backend import Backend, BatchOutput
from worker.models.factory import create_backend
from worker.models.lookalike import build_lookalike
from worker.models.onnx_backend import OnnxBackend
from worker.models.precision import MAX_DRIFT, choose, export_path, load_model, probe_images


@pytest.fixture(scope="module")
def tiny_marqo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lookalike("marqo", tmp_path_factory.mktemp("marqo"), tiny=True)


@pytest.fixture(scope="module")
def exported(tiny_marqo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from worker.models.export import export_onnx

    onnx_dir = tmp_path_factory.mktemp("onnx")
    backend = create_backend(str(tiny_marqo), device="cpu", precision="fp32")
    target = export_path(onnx_dir, backend.card)
    export_onnx(backend, target)
    return onnx_dir, target


def test_export_carries_card_and_matches_torch(
    tiny_marqo: Path, exported: tuple[Path, Path]
) -> None:
    _, target = exported
    torch_backend = create_backend(str(tiny_marqo), device="cpu", precision="fp32")
    onnx_backend = create_backend(str(target))
    assert isinstance(onnx_backend, OnnxBackend)
    assert onnx_backend.card.labels == torch_backend.card.labels == ("NSFW", "SFW")
    assert onnx_backend.card.crop == torch_backend.card.crop == "center"
    images = probe_images(6)
    expected = torch_backend.predict(images, embed=True)
    got = onnx_backend.predict(images, embed=True)
    for e, g in zip(expected, got, strict=True):
        for label in e.scores.probabilities:
            assert abs(e.scores.probabilities[label] - g.scores.probabilities[label]) < 1e-4
        assert e.embedding is not None and g.embedding is not None
        np.testing.assert_allclose(g.embedding, e.embedding, atol=1e-4)


def test_auto_considers_the_onnx_export(tiny_marqo: Path, exported: tuple[Path, Path]) -> None:
    onnx_dir, _ = exported
    backend = load_model(str(tiny_marqo), device="cpu", precision="auto", onnx_dir=onnx_dir)
    # Whatever wins, it must score the probe batch within the drift bound of fp32.
    reference = create_backend(str(tiny_marqo), device="cpu", precision="fp32")
    images = probe_images()
    batch_ref = reference.forward(np.stack([reference.preprocess(i) for i in images]))
    batch = backend.forward(np.stack([backend.preprocess(i) for i in images]))
    assert np.abs(batch.probabilities - batch_ref.probabilities).max() <= MAX_DRIFT
    assert (backend.card.runtime, backend.precision) in {
        ("timm", "fp32"),
        ("timm", "bf16"),
        ("onnx", "fp32"),
    }


def test_fixed_precision_is_honoured(tiny_marqo: Path) -> None:
    backend = load_model(str(tiny_marqo), device="cpu", precision="bf16")
    assert backend.precision == "bf16"
    assert backend.predict(probe_images(2))[0].scores.nsfw_score >= 0.0


class _Skewed(Backend):
    """A candidate whose scores are shifted: fast, but out of the drift bound."""

    def __init__(self, inner: Backend, shift: float) -> None:
        self.inner = inner
        self.card = inner.card
        self.precision = f"skewed{shift}"
        self.shift = shift

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        out = self.inner.forward(batch, embed)
        probabilities = np.clip(out.probabilities + self.shift, 0, 1).astype(np.float32)
        return BatchOutput(probabilities, out.embeddings)


def test_auto_refuses_a_candidate_that_drifts(tiny_marqo: Path) -> None:
    base = create_backend(str(tiny_marqo), device="cpu", precision="fp32")
    drifting = _Skewed(base, shift=2 * MAX_DRIFT)
    within = _Skewed(base, shift=MAX_DRIFT / 4)
    chosen = choose(base, [drifting])
    assert chosen is base
    assert choose(base, [drifting, within]) in (base, within)


def test_card_from_an_older_export_still_reads(tiny_marqo: Path) -> None:
    import json

    from worker.errors import ModelConfigError
    from worker.models.card import ModelCard

    card = create_backend(str(tiny_marqo), device="cpu", precision="fp32").card
    stored = json.loads(card.to_json())
    stored["channels_last_bgr"] = False  # a field an older modq wrote
    assert ModelCard.from_json(json.dumps(stored)) == card
    del stored["labels"]
    with pytest.raises(ModelConfigError, match="re-export"):
        ModelCard.from_json(json.dumps(stored))


def test_auto_skips_an_unreadable_export(tiny_marqo: Path, tmp_path: Path) -> None:
    base = create_backend(str(tiny_marqo), device="cpu", precision="fp32")
    stale = export_path(tmp_path, base.card)
    stale.write_bytes(b"not an onnx graph")
    backend = load_model(str(tiny_marqo), device="cpu", precision="auto", onnx_dir=tmp_path)
    assert backend.card.runtime == "timm"
