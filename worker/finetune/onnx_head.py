"""Head mode for ONNX base models (the bundled open_nsfw): a new graph, no torch.

ONNX Runtime cannot train, but a linear probe needs no backward pass through the base: the
written graph is the base graph up to its pre-logits tensor, then the trained head
(``MatMul`` + ``Add``, initializers from numpy) and a ``Softmax``. The modq model card
(labels, unsafe labels, preprocessing) travels in the graph's metadata, as
``modq models export-onnx`` stores it, so ``--model`` loads the graph like any export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import ModelConfigError
from worker.finetune.head import LinearHead
from worker.models.backend import Backend, BatchOutput
from worker.models.card import ModelCard
from worker.models.onnx_backend import CARD_METADATA_KEY

__all__ = ["HeadOnEmbeddings", "head_card", "write_onnx_head"]

PROBABILITIES = "probabilities"
# Fine-tuned heads get the generic thresholds: the base model's (Yahoo's 0.2 / 0.8 for
# open_nsfw) were set for its own head's scores, not for this one's.
DEFAULT_THRESHOLDS = {"review_at": 0.5, "block_at": 0.85}


class HeadOnEmbeddings(Backend):
    """The trained head applied in numpy to the base model's embeddings: what the written
    graph must reproduce, and the in-memory model a run hands back."""

    def __init__(self, base: Backend, head: LinearHead, card: ModelCard) -> None:
        self.base = base
        self.head = head
        self.card = card
        self.device = base.device

    def preprocess(self, image: Any) -> np.ndarray:
        return self.base.preprocess(image)

    def forward(self, batch: np.ndarray, embed: bool = False) -> BatchOutput:
        output = self.base.forward(batch, embed=True)
        if output.embeddings is None:
            raise ModelConfigError(f"{self.base.card.id} returned no embedding")
        probabilities = self.head.probabilities(output.embeddings)
        return BatchOutput(probabilities, output.embeddings if embed else None)


def head_card(
    base: ModelCard,
    name: str,
    labels: tuple[str, ...],
    unsafe: tuple[str, ...],
    head: LinearHead,
    modq: dict[str, Any],
) -> ModelCard:
    """The card of the new graph. Its revision digests the base revision, the labels and
    the head's weights, so cached scores of another fine-tune are never reused."""
    digest = hashlib.sha256()
    digest.update(base.cache_namespace.encode())
    digest.update(json.dumps([labels, unsafe]).encode())
    digest.update(np.ascontiguousarray(head.weight).tobytes())
    digest.update(np.ascontiguousarray(head.bias).tobytes())
    kept = {k: v for k, v in base.extra.items() if k not in DEFAULT_THRESHOLDS}
    return dataclasses.replace(
        base,
        id=f"local:{name}",
        revision=f"sha256:{digest.hexdigest()[:16]}",
        labels=labels,
        graded=False,
        declared_unsafe=unsafe,
        architecture=f"{base.architecture} + fine-tuned linear head",
        extra={
            **kept,
            **DEFAULT_THRESHOLDS,
            "onnx_scores": PROBABILITIES,
            "onnx_scores_kind": "probabilities",
            "modq": modq,
        },
    )


def write_onnx_head(
    base_graph: Path, base: ModelCard, head: LinearHead, card: ModelCard, out: Path
) -> None:
    """Write the base graph cut at its embedding, plus ``head`` and a softmax, to ``out``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    source = str(base.extra.get("onnx_input", ""))
    embedding = str(base.extra.get("onnx_embedding", ""))
    if not source or not embedding:
        raise ModelConfigError(f"{base.id}: the graph names no input or embedding to cut at")
    model = onnx.load(str(base_graph))
    nodes, initializers = _up_to(model.graph, embedding)
    inputs = [i for i in model.graph.input if i.name == source]
    if not nodes or not inputs:
        raise ModelConfigError(f"{base_graph}: no path from {source!r} to {embedding!r}")
    weight = numpy_helper.from_array(np.ascontiguousarray(head.weight.T), "modq_head/weight")
    bias = numpy_helper.from_array(np.ascontiguousarray(head.bias), "modq_head/bias")
    nodes += [
        helper.make_node("MatMul", [embedding, weight.name], ["modq_head/matmul"], "modq_head/mm"),
        helper.make_node("Add", ["modq_head/matmul", bias.name], ["logits"], "modq_head/add"),
        helper.make_node("Softmax", ["logits"], [PROBABILITIES], "modq_head/softmax", axis=1),
    ]
    count, dim = len(card.labels), head.weight.shape[1]
    outputs = [
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", count]),
        helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["batch", dim]),
    ]
    graph = helper.make_graph(
        nodes, "modq_finetuned", inputs, outputs, [*initializers, weight, bias]
    )
    written = helper.make_model(
        graph, opset_imports=list(model.opset_import), producer_name="modq finetune"
    )
    written.ir_version = model.ir_version
    entry = written.metadata_props.add()
    entry.key, entry.value = CARD_METADATA_KEY, card.to_json()
    try:
        onnx.checker.check_model(written, full_check=True)
    except Exception as exc:  # onnx raises its own untyped validation errors
        raise ModelConfigError(f"the fine-tuned graph does not validate: {exc}") from exc
    onnx.save(written, str(out))


def _up_to(graph: Any, tensor: str) -> tuple[list[Any], list[Any]]:
    """The nodes and initializers ``tensor`` depends on, in the graph's order."""
    needed = {tensor}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    return kept, [t for t in graph.initializer if t.name in needed]
