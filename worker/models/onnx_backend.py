"""ONNX Runtime backend: the bundled open_nsfw graph and graphs exported by modq."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from worker.errors import ModelConfigError
from worker.models.backend import Backend, BatchOutput
from worker.models.card import ModelCard

__all__ = ["OnnxBackend", "providers_for", "read_card_metadata", "with_extra_output"]

CARD_METADATA_KEY = "modq.card"


def read_card_metadata(path: Path) -> ModelCard | None:
    """The card modq stores in a graph it exported, or None for a foreign graph."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise their own untyped errors
        raise ModelConfigError(f"{path} is not a readable ONNX graph: {exc}") from exc
    for prop in model.metadata_props:
        if prop.key == CARD_METADATA_KEY:
            return ModelCard.from_json(prop.value)
    return None


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def with_extra_output(path: Path, name: str) -> bytes:
    """Expose an intermediate tensor (open_nsfw's pool5) as a graph output, in memory."""
    import onnx

    model = onnx.load(str(path))
    if name not in {out.name for out in model.graph.output}:
        info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        model.graph.output.append(info)
    return bytes(model.SerializeToString())


class OnnxBackend(Backend):
    """Runs a graph whose names the card lists in ``extra``.

    ``onnx_input``: the input; ``onnx_scores``: probabilities or logits (``onnx_scores_kind``);
    ``onnx_embedding``: the pre-logits tensor, exposed as an output if it is internal.
    """

    def __init__(self, card: ModelCard, path: Path, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        self.card = card
        self.path = path
        self.device = device
        self.precision = "fp32"
        self._input = str(card.extra.get("onnx_input", "pixel_values"))
        self._scores = str(card.extra.get("onnx_scores", "logits"))
        self._scores_are_logits = card.extra.get("onnx_scores_kind", "logits") == "logits"
        self._embedding = card.extra.get("onnx_embedding")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3
        # Idle intra-op threads would otherwise spin on the cores the decode threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph: str | bytes = str(path)
        if self._embedding:
            graph = with_extra_output(path, str(self._embedding))
        try:
            self._session = ort.InferenceSession(graph, options, providers=providers_for(device))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelConfigError(f"cannot load ONNX graph {path}: {exc}") from exc
        names = {i.name for i in self._session.get_inputs()}
        if self._input not in names:
            raise ModelConfigError(f"{path}: no input named {self._input!r} (has {sorted(names)})")

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        wanted = [self._scores] + ([str(self._embedding)] if embed and self._embedding else [])
        outputs = self._session.run(wanted, {self._input: batch.astype(np.float32, copy=False)})
        scores = np.asarray(outputs[0], dtype=np.float32)
        if self._scores_are_logits:
            scores = _softmax(scores)
        embeddings = None
        if len(outputs) > 1:
            embeddings = np.asarray(outputs[1], dtype=np.float32).reshape(len(batch), -1)
        return BatchOutput(scores, embeddings)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float32)
