"""Find a classifier's tail in an ONNX graph: conv map -> global average pool -> linear.

The walk starts at the graph's score output and goes backwards, so no tensor name is
assumed: (optional Softmax) <- Gemm, or Add(MatMul, bias) <- shape-only ops (Reshape,
Flatten, Squeeze, Identity, Dropout) <- GlobalAveragePool, an AveragePool whose window
must be checked against the map at run time, or ReduceMean over the two spatial axes <-
the activation. Anything else is refused: Grad-CAM's one-pass shortcut is only exact for
this structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.errors import ModelConfigError

__all__ = ["ConvTail", "find_conv_tail"]

_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Identity", "Dropout"}
_MAX_SHAPE_OPS = 6


@dataclass(frozen=True)
class ConvTail:
    activation: str  # the (N, C, H, W) tensor the pool reads
    weights: np.ndarray  # (C, K): logits = mean_hw(activation) @ weights + bias
    kernel: tuple[int, int] | None  # an AveragePool's window; it must equal (H, W)


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.constants: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in graph.initializer
        }
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute:
                value = _attribute(node, "value")
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)

    def node(self, name: str, what: str) -> Any:
        node = self.producer.get(name)
        if node is None:
            raise _refuse(f"{what} {name!r} is a graph input or unknown")
        return node


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _refuse(detail: str) -> ModelConfigError:
    return ModelConfigError(
        "Grad-CAM on an ONNX graph needs a classifier ending conv -> global average pool -> "
        f"linear (-> softmax); {detail}"
    )


def find_conv_tail(model: Any, scores: str) -> ConvTail:
    """The activation and classifier weights behind the output ``scores`` of ``model`` (an
    ``onnx.ModelProto``); ``ModelConfigError`` if the graph does not end that way."""
    graph = _Graph(model)
    node = graph.node(scores, "score output")
    if node.op_type == "Softmax":
        node = graph.node(node.input[0], "softmax input")
    features, weights = _linear(graph, node)
    for _ in range(_MAX_SHAPE_OPS):
        node = graph.node(features, "classifier input")
        if node.op_type not in _PASS_THROUGH:
            break
        features = node.input[0]
    activation, kernel = _pool(graph, node)
    return ConvTail(activation, weights, kernel)


def _linear(graph: _Graph, node: Any) -> tuple[str, np.ndarray]:
    """The linear layer's input name and its (C, K) weights."""
    if node.op_type == "Gemm":
        if _attribute(node, "transA", 0) or node.input[1] not in graph.constants:
            raise _refuse("its Gemm is not input x constant weights")
        weights = graph.constants[node.input[1]].astype(np.float64)
        if _attribute(node, "transB", 0):
            weights = weights.T
        return node.input[0], weights * float(_attribute(node, "alpha", 1.0))
    if node.op_type == "Add":
        bias_first = node.input[0] in graph.constants
        node = graph.node(node.input[1] if bias_first else node.input[0], "bias-add input")
    if node.op_type == "MatMul" and node.input[1] in graph.constants:
        weights = graph.constants[node.input[1]].astype(np.float64)
        if weights.ndim == 2:
            return node.input[0], weights
    raise _refuse(f"the scores come from {node.op_type} {node.name!r}, not a linear layer")


def _pool(graph: _Graph, node: Any) -> tuple[str, tuple[int, int] | None]:
    if node.op_type == "GlobalAveragePool":
        return node.input[0], None
    if node.op_type == "AveragePool":
        pads = list(_attribute(node, "pads", []) or [])
        auto_pad = _attribute(node, "auto_pad", b"NOTSET")
        kernel = tuple(int(k) for k in _attribute(node, "kernel_shape", []))
        if (
            any(pads)
            or auto_pad not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
            or len(kernel) != 2
        ):
            raise _refuse(f"AveragePool {node.name!r} pads its input or is not 2-D")
        return node.input[0], (kernel[0], kernel[1])
    if node.op_type == "ReduceMean":
        axes = _attribute(node, "axes")
        if axes is None and len(node.input) > 1:
            axes = graph.constants.get(node.input[1])
        if axes is not None and {int(a) % 4 for a in np.ravel(axes)} == {2, 3}:
            return node.input[0], None
        raise _refuse(f"ReduceMean {node.name!r} does not average the two spatial axes")
    raise _refuse(f"the linear layer reads {node.op_type} {node.name!r}, not an average pool")
