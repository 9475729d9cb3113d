"""Export a torch model to ONNX with its card, so ONNX Runtime can serve it."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from worker.errors import ModelConfigError
from worker.models.backend import Backend
from worker.models.onnx_backend import CARD_METADATA_KEY

__all__ = ["export_onnx"]


def export_onnx(backend: Backend, out: Path, opset: int = 18) -> Path:
    """Write ``backend``'s fp32 model to ``out`` with outputs ``logits`` and ``embedding`` and
    the model card in the graph's metadata."""
    import onnx
    import torch

    from worker.models.torch_backend import TorchBackend

    if not isinstance(backend, TorchBackend) or backend.precision != "fp32":
        raise ModelConfigError("export-onnx needs a torch model loaded in fp32")

    class _Both(torch.nn.Module):
        def __init__(self, inner: TorchBackend) -> None:
            super().__init__()
            self.inner = inner.model
            self._backend = inner

        def forward(self, pixels: torch.Tensor) -> Any:
            return self._backend.logits_and_embedding(pixels)

    size = backend.card.input_size
    example = torch.zeros(2, 3, size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        # onnxscript's optimiser notes its own internals; the export itself is checked below.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            _Both(backend).eval(),
            (example,),
            input_names=["pixel_values"],
            output_names=["logits", "embedding"],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ModelConfigError(f"{backend.card.id}: the ONNX exporter produced no program")
    program.save(str(staging))
    card = dataclasses.replace(
        backend.card,
        runtime="onnx",
        extra={
            **backend.card.extra,
            "onnx_input": "pixel_values",
            "onnx_scores": "logits",
            "onnx_scores_kind": "logits",
            "onnx_embedding": "embedding",
        },
    )
    model = onnx.load(str(staging))
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_METADATA_KEY, card.to_json()
    onnx.save(model, str(out))
    staging.unlink()
    return out
