"""The naive queue design that `bench/queue_worker.py` compares modq's worker with.

What a typical user writes first: a Celery app with one task per image, which opens the file
with PIL and runs the classifier on that one image, and a worker started with

    celery -A bench.naive_worker worker --pool=solo -Q bench-naive

(run from the repository root). The classifier is transformers'
``pipeline("image-classification")`` on the model directory, loaded once per process on the
first task, at the same precision as modq (``dtype=torch.bfloat16`` or ``torch.float32``).
The bundled ``opennsfw`` model is ONNX and has no transformers pipeline: there the task calls
modq's ``Backend.predict([image])``, one ONNX forward pass at batch 1 with modq's own
preprocessing. Either way every image is decoded at full size (no JPEG draft mode) and runs
through the model alone: no batching, no cache, no hashing.

The task returns the top score and also writes ``request_id`` and ``score`` to a Redis
stream, which the benchmark reads to time the last result; there is no Celery result
backend. Configuration comes from the environment:

- ``NAIVE_BROKER_URL``: the broker (Redis), also where the stream lives;
- ``NAIVE_MODEL``: ``opennsfw`` or a transformers model directory;
- ``NAIVE_PRECISION``: ``fp32`` or ``bf16``;
- ``NAIVE_THREADS``: torch / ONNX Runtime intra-op threads (0 = all cores);
- ``NAIVE_STREAM``: the result stream (default ``bench-naive-results``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from celery import Celery
from PIL import Image

BROKER_URL = os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("NAIVE_STREAM", "bench-naive-results")
TASK = "bench.naive.classify"
QUEUE = "bench-naive"

app = Celery("naive", broker=BROKER_URL)
app.conf.task_default_queue = QUEUE


@functools.cache
def _results() -> redis.Redis:
    return redis.Redis.from_url(BROKER_URL)


@functools.cache
def _classifier() -> Callable[[Image.Image], float]:
    """The model, loaded once per process; returns a function image -> top score."""
    model = os.environ.get("NAIVE_MODEL", "opennsfw")
    precision = os.environ.get("NAIVE_PRECISION", "fp32")
    threads = int(os.environ.get("NAIVE_THREADS", "0")) or (os.cpu_count() or 1)
    if model == "opennsfw":
        from worker.models.precision import load_model

        backend = load_model(model, "cpu", precision, threads)

        def onnx_top(image: Image.Image) -> float:
            output = backend.predict([image.convert("RGB")])[0]
            return max(output.scores.probabilities.values())

        return onnx_top

    import torch

    from worker.models._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import pipeline

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    classify = pipeline("image-classification", model=model, dtype=dtype, device="cpu")

    def pipeline_top(image: Image.Image) -> float:
        ranked: Any = classify(image)
        return float(ranked[0]["score"])

    return pipeline_top


@app.task(name=TASK)
def classify(ref: str, request_id: str) -> float:
    """Score the image at ``ref`` (a file:// URI) and publish its top score."""
    with Image.open(unquote(urlsplit(ref).path)) as image:
        score = _classifier()(image)
    _results().xadd(STREAM, {"request_id": request_id, "score": score})
    return score
