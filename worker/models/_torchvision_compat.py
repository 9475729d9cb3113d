"""Let torchvision's pure-Python parts import next to a torch build its compiled ops don't match.

timm and transformers' image processors import torchvision, and torchvision registers fake
kernels for its own operators at import time. When its compiled library cannot load (a CUDA
torchvision wheel beside a CPU torch, as in modq's CPU install), that registration dies with
``operator torchvision::nms does not exist``. Defining the two operator schemas, with no
kernels, is enough for the import to finish; modq never calls them. Where the library loads
(matching builds, as on most users' machines) this does nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["ensure_torchvision_importable"]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: object | None = None  # keeps the schema registrations alive


def _ops_loadable() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to repair: the import fails on its own terms
    try:
        for lib in Path(spec.origin).parent.glob("_C*.so"):
            torch.ops.load_library(str(lib))  # type: ignore[no-untyped-call]
    except OSError:
        return False
    return True


def ensure_torchvision_importable() -> None:
    global _library
    import torch

    if _library is not None or hasattr(torch.ops.torchvision, "nms") or _ops_loadable():
        return
    library = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
    for schema in _SCHEMAS:
        library.define(schema)  # type: ignore[no-untyped-call]
    _library = library
