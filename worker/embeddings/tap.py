"""Feeds a sink from the pipeline: one record per image the model scored.

A record is written once the image's place is settled: at once when its verdict calls for no
quarantine action, after the action when it does, so a record of a moved image names where it
went (``location``) and a contact sheet can still show it. Records waiting for an action are
few (blocked images in flight); past ``max_waiting`` the oldest is written without a location.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from worker.embeddings.record import EmbeddingRecord
from worker.embeddings.sink import EmbeddingSink
from worker.messages import ModerationResult

__all__ = ["EmbeddingTap"]


class EmbeddingTap:
    def __init__(self, sink: EmbeddingSink, max_waiting: int = 10_000) -> None:
        self.sink = sink
        self.max_waiting = max_waiting
        self._waiting: OrderedDict[str, EmbeddingRecord] = OrderedDict()
        self._lock = threading.Lock()

    def scored(self, result: ModerationResult, vector: np.ndarray, awaiting_action: bool) -> None:
        record = _record(result, vector)
        if not awaiting_action:
            self.sink.write(record)
            return
        with self._lock:
            self._waiting[result.request_id] = record
            evicted = (
                self._waiting.popitem(last=False) if len(self._waiting) > self.max_waiting else None
            )
        if evicted is not None:
            self.sink.write(evicted[1])

    def acted(self, result: ModerationResult) -> None:
        """The action ``result`` reports is done (or failed): write its waiting record."""
        with self._lock:
            record = self._waiting.pop(result.request_id, None)
        if record is None:
            return
        action = result.action
        if action is not None and action.kind == "quarantine_move" and action.location:
            record = replace(record, location=action.location)
        self.sink.write(record)

    def close(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), OrderedDict()
        for record in waiting:
            self.sink.write(record)
        self.sink.close()


def _record(result: ModerationResult, vector: np.ndarray) -> EmbeddingRecord:
    model = result.model
    return EmbeddingRecord(
        request_id=result.request_id,
        image=result.image,
        sha256=result.hashes.sha256 if result.hashes else "",
        model=model.id if model else "",
        revision=model.revision if model else "",
        verdict=result.verdict.value if result.verdict else "",
        nsfw_score=float(result.nsfw_score or 0.0),
        vector=np.asarray(vector, dtype=np.float32),
    )
