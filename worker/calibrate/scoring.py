"""Score a labelled set with the pipeline `modq scan` and the worker run.

Same model loading, decode limits, draft decoding and batching, with no cache and no
quarantine, so a threshold chosen on these scores means the same thing in the worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.calibrate.dataset import LabelledImage
from worker.config import BatchingSettings
from worker.messages import ModelInfo, ModerationResult, Status
from worker.pipeline import Pipeline

__all__ = ["FailedImage", "ScoredImage", "ScoredSet", "score_images"]


@dataclass(frozen=True)
class ScoredImage:
    image: LabelledImage
    score: float


@dataclass(frozen=True)
class FailedImage:
    """An image the pipeline could not score (corrupt, over a limit): left out, reported."""

    image: LabelledImage
    code: str
    message: str


@dataclass(frozen=True)
class ScoredSet:
    scored: list[ScoredImage]  # in CSV order
    failed: list[FailedImage]
    model: ModelInfo
    exact_decode: bool


def score_images(
    batching: BatchingSettings,
    pipeline: Pipeline,
    images: Sequence[LabelledImage],
    on_result: Callable[[], None] | None = None,
) -> ScoredSet:
    """Run every image through ``Pipeline.process_many``; ``on_result`` is called once per
    finished image (a progress bar). The pipeline's policy decides nothing here: verdicts
    are recomputed from the chosen thresholds."""
    from worker.storage import file_ref

    by_ref = {file_ref(image.path): image for image in images}
    results: dict[str, ModerationResult] = {}
    for result in pipeline.process_many(by_ref, _concurrency(batching)):
        results[result.image] = result
        if on_result is not None:
            on_result()
    scored: list[ScoredImage] = []
    failed: list[FailedImage] = []
    for ref, image in by_ref.items():
        result = results[ref]
        if result.status is Status.OK and result.nsfw_score is not None:
            scored.append(ScoredImage(image, result.nsfw_score))
        else:
            error = result.error
            code, message = (error.code, error.message) if error else ("internal", "no score")
            failed.append(FailedImage(image, code, message))
    return ScoredSet(scored, failed, pipeline.model, pipeline.options.exact_decode)


def _concurrency(batching: BatchingSettings) -> int:
    # As in `modq scan`: enough threads to fill a batch while one runs, bounded by the cores.
    cores = os.cpu_count() or 1
    size = batching.max_batch_size
    return max(4, min(2 * size, size + 2 * cores))
