"""Turn an image into a query: embed it with the index's own model, through modq's pipeline
(same decoding, preprocessing and forward pass as the worker), and refuse another model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.config import Settings
from worker.errors import InvalidDataset, ModelConfigError
from worker.similarity.index import VectorIndex
from worker.similarity.sheet import reader_for
from worker.storage import file_ref

__all__ = ["embed_image", "model_spec_for"]


def model_spec_for(index: VectorIndex) -> str:
    """The preset that made the index's embeddings; other models must be named."""
    from worker.models.registry import PRESETS, resolve

    model_id = index.meta["model"]
    for preset in PRESETS.values():
        if preset.hub_id == model_id:
            return preset.name
    if resolve("opennsfw").model_id == model_id:
        return "opennsfw"
    raise ModelConfigError(
        f"the index was built with {index.model}, which is no preset: pass --model DIR"
    )


def embed_image(target: str, index: VectorIndex, settings: Settings) -> np.ndarray:
    """The embedding of the image at ``target`` (a path or a file://, s3:// reference)."""
    from worker.runtime import build_runtime

    ref = target if "://" in target else file_ref(Path(target))
    store = reader_for([ref], settings.storage)
    with build_runtime(
        settings, store=store, cache=None, quarantine=None, extras=False, embed=True
    ) as runtime:
        card = runtime.backend.card
        if (card.id, card.revision) != (index.meta["model"], index.meta["revision"]):
            raise InvalidDataset(
                f"the index holds embeddings of {index.model}; {card.id}@{card.revision} "
                "cannot query it"
            )
        result = runtime.pipeline.process(ref)
    if result.error is not None:
        raise InvalidDataset(f"{target}: [{result.error.code}] {result.error.message}")
    return np.asarray(result.embedding, dtype=np.float32)
