"""What a verdict calls for, taken once the image has been assessed: a heatmap for a
``review`` verdict, the quarantine action for a ``block``, and the image's embedding to the
sink. Assessing has no side effects; every side effect of the pipeline is here.

    Assessed ─▶ heatmap (review) ─▶ quarantine (block) ─▶ embedding record ─▶ result

The quarantine step is idempotent (``worker.quarantine``): run again on a result whose
action a dead delivery began, it finishes the move and answers the same location. The
embedding record is written once, after the quarantine attempt, naming where a moved image
went; a delivery that finishes another's action has no vector and writes none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.config import QuarantineAction
from worker.embeddings.record import EmbeddingRecord
from worker.embeddings.sink import EmbeddingSink
from worker.explain.attach import ReviewHeatmaps
from worker.messages import ActionInfo, ModerationResult, Verdict
from worker.quarantine import Quarantine

__all__ = ["Actions", "Assessed"]

_ACTION_KINDS: dict[str, Literal["quarantine_move", "quarantine_copy", "tag"]] = {
    "move": "quarantine_move",
    "copy": "quarantine_copy",
    "tag": "tag",
}


@dataclass(frozen=True)
class Assessed:
    """An image's result before any action, with what the actions need from its assessment:
    the bytes (a heatmap is drawn on them) and the embedding the model computed."""

    result: ModerationResult
    data: bytes | None = None
    embedding: np.ndarray | None = None


class Actions:
    def __init__(
        self,
        quarantine: Quarantine | None = None,
        heatmaps: ReviewHeatmaps | None = None,
        sink: EmbeddingSink | None = None,
    ) -> None:
        self.quarantine = quarantine
        self.heatmaps = heatmaps
        self.sink = sink

    @property
    def wants_embeddings(self) -> bool:
        """With a sink, every image the model scores has its embedding computed."""
        return self.sink is not None

    def due(self, result: ModerationResult) -> QuarantineAction | None:
        """The quarantine action ``result``'s verdict calls for and has not had yet.
        Read-only sources (``http(s)://``) are never acted on: the caller owns the image."""
        quarantine = self.quarantine
        if (
            quarantine is None
            or result.verdict is not Verdict.BLOCK
            or result.hashes is None
            or (result.action is not None and result.action.kind != "none")
            or not quarantine.handles(result.image)
        ):
            return None
        return quarantine.action

    def act(self, assessed: Assessed) -> ModerationResult:
        """Take every action ``assessed`` calls for. A quarantine failure is raised (its
        typed error); the embedding record is written either way, without a location."""
        result = assessed.result
        if (
            self.heatmaps is not None
            and assessed.data is not None
            and result.verdict is Verdict.REVIEW
            and result.explanation is None
            and result.hashes is not None
        ):
            explanation = self.heatmaps.attach(
                assessed.data, result.hashes.sha256, result.request_id
            )
            result = result.model_copy(update={"explanation": explanation})
        acted = result
        try:
            acted = self.finish(result)
        finally:
            if self.sink is not None and assessed.embedding is not None:
                self.sink.write(_record(acted, assessed.embedding))
        return acted

    def finish(self, result: ModerationResult) -> ModerationResult:
        """The quarantine action ``result`` calls for, begun or not: idempotent."""
        quarantine = self.quarantine
        if self.due(result) is None or quarantine is None or result.hashes is None:
            return result
        record = {
            "request_id": result.request_id,
            "verdict": Verdict.BLOCK.value,  # due(): only blocks are acted on
            "nsfw_score": result.nsfw_score,
            "scores": result.scores,
            "model": result.model.model_dump() if result.model else None,
        }
        location = quarantine.apply(result.image, result.hashes.sha256, record)
        action = ActionInfo(kind=_ACTION_KINDS[quarantine.action], location=location)
        return result.model_copy(update={"action": action})

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def _record(result: ModerationResult, vector: np.ndarray) -> EmbeddingRecord:
    model = result.model
    action = result.action
    moved = action is not None and action.kind == "quarantine_move" and action.location
    return EmbeddingRecord(
        request_id=result.request_id,
        image=result.image,
        sha256=result.hashes.sha256 if result.hashes else "",
        model=model.id if model else "",
        revision=model.revision if model else "",
        verdict=result.verdict.value if result.verdict else "",
        nsfw_score=float(result.nsfw_score or 0.0),
        vector=np.asarray(vector, dtype=np.float32),
        location=action.location if moved and action else None,
    )
