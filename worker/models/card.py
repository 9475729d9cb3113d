"""What modq knows about a model: labels, preprocessing and where it came from.

A card is built from the model's own files (config.json, preprocessor_config.json, ONNX
metadata), so settings never repeat what the model already knows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from worker.errors import ModelConfigError

__all__ = [
    "UNSAFE_LABELS",
    "Crop",
    "ModelCard",
    "Runtime",
]

Runtime = Literal["onnx", "timm", "transformers"]
# caffe: open_nsfw's 256 squash + JPEG round trip + 224 centre crop, BGR mean subtraction.
# center: short side to the input size, then a centre crop (timm "center", crop_pct 1.0).
# squash: straight resize to the input size, aspect ratio ignored (PIL ops, as timm does).
# squash_tv: the same squash done by torchvision on a uint8 tensor with antialias, as the
#            transformers 5 image processors do.
Crop = Literal["caffe", "center", "squash", "squash_tv"]

# Label names that mean "unsafe" in the binary models modq knows; matched case-insensitively.
UNSAFE_LABELS = frozenset({"nsfw", "unsafe", "porn", "hentai", "sexy", "explicit"})


@dataclass(frozen=True)
class ModelCard:
    id: str
    revision: str
    runtime: Runtime
    labels: tuple[str, ...]
    input_size: int
    crop: Crop
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int | None
    license: str = "unknown"
    architecture: str = ""
    # Graded models (Freepik) list their labels from safest to worst; scores are cumulative.
    graded: bool = False
    # Bumped whenever modq's preprocessing for this kind of model changes, so cached scores
    # from an older preprocessing are never reused.
    preprocess_version: str = "1"
    # Labels that mean unsafe, as a fine-tune declared them (config.json's ``modq`` block):
    # a team's own label set need not use any name in UNSAFE_LABELS.
    declared_unsafe: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        unknown = [label for label in self.declared_unsafe if label not in self.labels]
        if unknown:
            raise ValueError(
                f"model {self.id}: unsafe labels {unknown} are not among {list(self.labels)}"
            )
        if not self.graded and not self.unsafe_labels:
            raise ValueError(
                f"model {self.id}: no label among {list(self.labels)} names unsafe content "
                f"(expected one of {sorted(UNSAFE_LABELS)})"
            )

    @property
    def unsafe_labels(self) -> tuple[str, ...]:
        if self.declared_unsafe:
            return self.declared_unsafe
        if self.graded:
            return self.labels[1:]
        return tuple(label for label in self.labels if label.lower() in UNSAFE_LABELS)

    @property
    def cache_namespace(self) -> str:
        """Scores are only reused for the same model, revision and preprocessing."""
        return f"{self.id}@{self.revision}/pp{self.preprocess_version}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Read a stored card; fields an older or newer modq wrote and this one does not know
        are ignored, and a card missing what this modq needs is a ModelConfigError."""
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            kept = {k: v for k, v in raw.items() if k in known}
            for key in ("labels", "mean", "std"):
                kept[key] = tuple(kept[key])
            kept["declared_unsafe"] = tuple(kept.get("declared_unsafe", ()))
            return cls(**kept)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelConfigError(
                f"unreadable model card ({exc}); re-export with `modq models export-onnx SPEC`"
            ) from exc
