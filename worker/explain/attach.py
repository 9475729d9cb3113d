"""Heatmaps for ``review`` verdicts, written as side objects a reviewer opens with the result.

The worker (``MODQ_REVIEW_HEATMAPS_URI``) writes ``<sha256>.png``, the image with the heatmap
over it, into a local folder or under an S3 prefix, and puts the object's reference in the
result's ``explanation``. Review verdicts are the ones a person looks at, and a small share of
traffic, so the extra decode and forward pass are spent only there. A heatmap is an aid:
when it cannot be made or written, the result goes out without one (logged and counted,
``modq_heatmap_errors_total``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace

from worker import metrics
from worker.decode import DecodeLimits, decode
from worker.errors import ModelConfigError, ModqError
from worker.explain.base import Explainer
from worker.explain.factory import create_explainer
from worker.log import get_logger
from worker.models.backend import Backend
from worker.storage.folders import ObjectFolder, open_folder

__all__ = ["ReviewHeatmaps"]

log = get_logger(__name__)


class ReviewHeatmaps:
    def __init__(
        self, explainer: Explainer, folder: ObjectFolder, limits: DecodeLimits, alpha: float = 0.45
    ) -> None:
        self.explainer = explainer
        self.folder = folder
        self.limits = replace(limits, sample_frames=1)  # the first frame is explained
        self.alpha = alpha

    @classmethod
    def build(
        cls,
        uri: str,
        backend: Backend,
        fp32: Callable[[], Backend],
        limits: DecodeLimits,
        s3_endpoint_url: str | None = None,
    ) -> ReviewHeatmaps:
        """Explain with the worker's own backend where its method allows; a backend it cannot
        explain (an ONNX export of a ViT) is loaded again at fp32 from the model's files
        (``fp32``)."""
        try:
            explainer = create_explainer(backend)
        except ModelConfigError:
            explainer = create_explainer(fp32())
        return cls(explainer, open_folder(uri, s3_endpoint_url), limits)

    def attach(self, data: bytes, sha256: str, request_id: str) -> str | None:
        """Write the heatmap of the image ``data`` holds; its reference, or None on failure."""
        try:
            frame = decode(data, self.limits).frames[0]
            heatmap = self.explainer.explain(frame)
            buffer = io.BytesIO()
            self.explainer.overlay(frame, heatmap, self.alpha).save(buffer, format="PNG")
            return self.folder.put(f"{sha256}.png", buffer.getvalue())
        except (ModqError, OSError, ValueError) as exc:
            metrics.HEATMAP_ERRORS.inc()
            log.warning("review heatmap not written", request_id=request_id, error=repr(exc))
            return None
