"""What runs beside the verdict, each off unless configured: the embedding sink, the
known-bad hash banks and review heatmaps. Built once from ``Settings`` by the worker and by
``modq scan``, handed to the pipeline, closed with it."""

from __future__ import annotations

from dataclasses import dataclass

from worker.banks.gate import BankGate
from worker.config import Settings
from worker.embeddings.tap import EmbeddingTap
from worker.explain.attach import ReviewHeatmaps
from worker.models.backend import Backend

__all__ = ["Extras"]


@dataclass(frozen=True)
class Extras:
    tap: EmbeddingTap | None = None
    banks: BankGate | None = None
    heatmaps: ReviewHeatmaps | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, backend: Backend, *, banks_until_read: bool = False
    ) -> Extras:
        """``banks_until_read``: images wait for the bank list until it has been read once."""
        tap = None
        if settings.embedding_sink:
            from worker.embeddings import open_sink

            tap = EmbeddingTap(open_sink(settings.embedding_sink, settings))
        banks = BankGate.from_settings(settings, until_read=banks_until_read)
        heatmaps = None
        if settings.review_heatmaps_uri:
            heatmaps = ReviewHeatmaps.from_settings(settings, settings.review_heatmaps_uri, backend)
        return cls(tap, banks, heatmaps)

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
        if self.banks is not None:
            self.banks.close()
