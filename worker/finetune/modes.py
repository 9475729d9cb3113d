"""The two modes, each from prepared data to a model written into the staging folder.

Each returns the training history and a function that, once the folder is in place, gives
the trained model as it is in memory (for torch, the very module that was written, with the
card the written directory yields; for ONNX, the numpy head over the base graph's
embeddings) so callers and tests can compare it with what ``--model DIR`` loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from worker.errors import ModelConfigError
from worker.finetune.context import RunContext
from worker.finetune.full import FullTrainer
from worker.finetune.head import train_head
from worker.finetune.onnx_head import HeadOnEmbeddings, head_card, write_onnx_head
from worker.finetune.save import load_head, swap_classifier, write_torch_model
from worker.finetune.train import History, OnEpoch, TrainOptions, fit
from worker.models.backend import Backend
from worker.models.factory import build_card
from worker.models.registry import ONNX_FILENAME, resolve

__all__ = ["Trained", "train_full", "train_head_mode"]

Trained = Callable[[Path], Backend]


def train_head_mode(
    run: RunContext, options: TrainOptions, on_epoch: OnEpoch | None
) -> tuple[History, Trained]:
    assert run.extraction is not None
    names = run.dataset.labels
    head, history = train_head(
        run.extraction.arrays, run.extraction.labels, run.split, names, options, on_epoch
    )
    base = run.base
    if base.card.runtime == "onnx":
        card = head_card(base.card, run.out.name, names, run.unsafe, head, run.modq_block())
        write_onnx_head(run.resolved.path, base.card, head, card, run.staging / ONNX_FILENAME)
        return history, lambda _out: HeadOnEmbeddings(base, head, card)
    from worker.models.torch_backend import TorchBackend

    if not isinstance(base, TorchBackend):
        raise ModelConfigError(f"{base.card.id}: no classifier to replace in this runtime")
    model = base.model
    load_head(swap_classifier(model, len(names)), head)
    _write_torch(run, model)
    return history, _torch_trained(run, model)


def train_full(
    run: RunContext, options: TrainOptions, on_epoch: OnEpoch | None
) -> tuple[History, Trained]:
    assert run.extraction is not None
    extraction = run.extraction
    trainer = FullTrainer(
        run.base, extraction.arrays, extraction.labels, run.split, len(run.dataset.labels), options
    )
    history = fit(trainer, extraction.labels[run.split[1]], run.dataset.labels, options, on_epoch)
    _write_torch(run, trainer.model)
    return history, _torch_trained(run, trainer.model)


def _write_torch(run: RunContext, model: object) -> None:
    write_torch_model(
        model,
        run.base.card.runtime,
        run.resolved.path,
        run.dataset.labels,
        run.modq_block(),
        run.staging,
    )


def _torch_trained(run: RunContext, model: object) -> Trained:
    def trained(out: Path) -> Backend:
        from worker.models.torch_backend import TorchBackend

        base = run.base
        assert isinstance(base, TorchBackend)
        card = build_card(resolve(str(out)))
        return type(base)(card, model, base.device, "fp32")

    return trained
