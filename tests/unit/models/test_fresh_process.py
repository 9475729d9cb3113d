"""modq's preprocessing in a fresh interpreter, where nothing imported timm first.

A worker running an exported transformers model on ONNX Runtime preprocesses with the
``squash_tv`` path (torchvision) without ever loading timm or transformers, so that path must
make torchvision importable itself (see ``worker/models/_torchvision_compat.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.unit.models._support import (
    RESULT_MARKER,
    require_torch_stack,
    result_of,
    run_python_process,
    save_images,
)

SQUASH_TV_SCRIPT = """
import json, sys
from PIL import Image
from worker.models.card import ModelCard
from worker.models.preprocess import preprocess

card = ModelCard.from_json(sys.argv[1])
shapes, sums = [], []
for path in sys.argv[2:]:
    with Image.open(path) as image:
        pixels = preprocess(card, image.convert("RGB"))
    shapes.append(list(pixels.shape))
    sums.append(float(pixels.astype("float64").sum()))
print(__MARKER__ + json.dumps({"shapes": shapes, "sums": sums}))
""".replace("__MARKER__", repr(RESULT_MARKER))


def test_squash_tv_preprocessing_in_a_fresh_interpreter(
    tiny_backend: Callable[[str], Any], images: list[Image.Image], tmp_path: Path
) -> None:
    require_torch_stack()
    backend = tiny_backend("falconsai")
    card = backend.card
    assert card.crop == "squash_tv"
    paths = save_images(images, tmp_path / "images")
    proc = run_python_process(SQUASH_TV_SCRIPT, [card.to_json(), *map(str, paths)], timeout=180)
    result = result_of(proc)
    size = card.input_size
    assert result["shapes"] == [[3, size, size]] * len(images)
    want = [float(backend.preprocess(image).astype(np.float64).sum()) for image in images]
    np.testing.assert_allclose(result["sums"], want, rtol=1e-9, atol=1e-6)
