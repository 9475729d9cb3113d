"""Which extra brings which optional module, so that a command or a worker missing one says
what to install instead of showing a traceback.

``pip install modq`` runs the bundled model end to end; ``modq[torch]`` adds the hub presets,
ONNX export, fine-tuning and heatmaps on torch models; ``modq[analysis]`` the indexes,
clustering and calibration charts."""

from __future__ import annotations

from worker.errors import MissingExtra

__all__ = ["EXTRA_OF", "missing_extra"]

#: Top-level module → the modq extra that installs it.
EXTRA_OF = {
    "torch": "torch",
    "torchvision": "torch",
    "timm": "torch",
    "transformers": "torch",
    "safetensors": "torch",
    "huggingface_hub": "torch",
    "onnxscript": "torch",
    "faiss": "analysis",
    "sklearn": "analysis",
    "matplotlib": "analysis",
    "pyarrow": "analysis",
    "flower": "flower",
}


def missing_extra(exc: ImportError) -> MissingExtra | None:
    """The error to show for ``exc`` when an extra of modq's would fix it, else None (a
    module modq always installs is missing: a broken install, not a missing extra)."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return MissingExtra(
        f"this needs {module}, from modq's {extra!r} extra: pip install 'modq[{extra}]'"
    )
