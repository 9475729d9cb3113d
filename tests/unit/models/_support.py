"""Helpers for the model tests: test images, the reference libraries' own code paths, and
running modq in a fresh interpreter (huggingface_hub reads HF_HUB_* at import time).

Nothing here imports torch at module level, so the torch-free tests still collect where the
``torch`` extra is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[3]
RESULT_MARKER = "MODQ-TEST-RESULT "

# Pre-logits widths of the real (full-size) models, from MODELS.md.
FULL_EMBEDDING_DIM = {
    "opennsfw": 1024,
    "marqo": 192,
    "falconsai": 768,
    "freepik": 768,
    "adamcodd": 768,
}


# --------------------------------------------------------------------------- images


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    return r, g, b


def make_images(seed: int = 0) -> list[Image.Image]:
    """Eight deterministic RGB images: noise, gradients, shapes, extreme aspect ratios and a
    tiny one, in sizes that exercise every resize path (up, down, odd, exact model size)."""
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = []

    # 1. uniform noise, landscape 4:3
    images.append(Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)))

    # 2. smooth three-channel gradient, 3:2
    h, w = 427, 640
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = np.stack([x / (w - 1), y / (h - 1), 1.0 - (x + y) / (w + h - 2)], axis=-1)
    images.append(Image.fromarray(np.round(grad * 255.0).astype(np.uint8)))

    # 3. filled shapes on a flat background, portrait
    shapes = Image.new("RGB", (360, 500), _colour(rng))
    draw = ImageDraw.Draw(shapes)
    for i in range(14):
        x0, y0 = int(rng.integers(0, 320)), int(rng.integers(0, 460))
        box = (x0, y0, x0 + int(rng.integers(8, 180)), y0 + int(rng.integers(8, 180)))
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=_colour(rng))
    draw.polygon([(10, 490), (180, 300), (350, 490)], fill=_colour(rng))
    images.append(shapes)

    # 4. very wide banner (about 42:1): vertical stripes plus noise
    stripes = np.zeros((24, 1000, 3), dtype=np.int16)
    stripes[:, (np.arange(1000) // 37) % 2 == 1] = (220, 40, 90)
    stripes += rng.integers(-30, 31, stripes.shape, dtype=np.int16)
    images.append(Image.fromarray(np.clip(stripes, 0, 255).astype(np.uint8)))

    # 5. very tall strip (1:40): a vertical gradient in one channel, noise in the others
    tall = rng.integers(0, 256, (800, 20, 3), dtype=np.uint8)
    tall[:, :, 1] = np.linspace(0, 255, 800, dtype=np.float32).astype(np.uint8)[:, None]
    images.append(Image.fromarray(tall))

    # 6. tiny 7x5 noise (upsampled by every model)
    images.append(Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)))

    # 7. skin-toned radial blob at 384x384 (Marqo's and AdamCodd's exact input size)
    yy, xx = np.mgrid[0:384, 0:384].astype(np.float32)
    radius = np.sqrt((xx - 200.0) ** 2 + (yy - 170.0) ** 2) / 270.0
    weight = np.clip(1.0 - radius, 0.0, 1.0)[..., None]
    skin = np.array([224.0, 172.0, 140.0], dtype=np.float32)
    background = np.array([30.0, 60.0, 110.0], dtype=np.float32)
    blob = weight * skin + (1.0 - weight) * background
    images.append(Image.fromarray(np.round(blob).astype(np.uint8)))

    # 8. blurred checkerboard with noise, odd square size
    cells = ((np.arange(449)[:, None] // 29) + (np.arange(449)[None, :] // 29)) % 2
    board = np.where(cells[..., None] == 1, np.uint8(235), np.uint8(20)).repeat(3, axis=2)
    board = np.clip(board.astype(np.int16) + rng.integers(-40, 41, board.shape), 0, 255)
    checker = Image.fromarray(board.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    images.append(checker)

    assert all(image.mode == "RGB" for image in images)
    return images


def save_images(images: Sequence[Image.Image], directory: Path) -> list[Path]:
    """PNG is lossless: a subprocess reading these back sees the same pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = directory / f"image-{i}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- torch stack


def require_torch_stack() -> None:
    """Skip unless the ``torch`` extra is installed; make timm/transformers importable."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from worker.models._torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    pytest.importorskip("timm")
    pytest.importorskip("transformers")


def probability_rows(outputs: Sequence[Any], labels: Sequence[str]) -> np.ndarray:
    return np.array([[o.scores.probabilities[label] for label in labels] for o in outputs])


def nsfw_scores(outputs: Sequence[Any]) -> np.ndarray:
    return np.array([o.scores.nsfw_score for o in outputs])


def config_labels(directory: Path) -> list[str]:
    """Label names in index order, as the model's own config.json lists them."""
    config = json.loads((directory / "config.json").read_text())
    if "label_names" in config:
        return list(config["label_names"])
    id2label = config["id2label"]
    return [id2label[k] for k in sorted(id2label, key=int)]


@dataclass
class Reference:
    labels: list[str]  # index order
    pixels: np.ndarray  # (N, 3, S, S) what the reference library feeds the network
    probabilities: list[dict[str, float]]  # per image, by label name
    embeddings: np.ndarray | None = None  # (N, D) pre-logits, when asked for

    def matrix(self, labels: Sequence[str]) -> np.ndarray:
        return np.array([[row[label] for label in labels] for row in self.probabilities])


def timm_reference(
    directory: Path, images: Sequence[Image.Image], embed: bool = False
) -> Reference:
    """Marqo as timm runs it: ``local-dir:`` model, the model's own data config and transform."""
    import timm
    import torch

    model = timm.create_model("local-dir:" + str(directory), pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    pixels = torch.stack([transform(image) for image in images])
    labels = config_labels(directory)
    with torch.inference_mode():
        probs = model(pixels).softmax(dim=-1).numpy()
        embeddings = None
        if embed:
            features = model.forward_features(pixels)
            embeddings = model.forward_head(features, pre_logits=True).numpy()
    rows = [{label: float(p) for label, p in zip(labels, row, strict=True)} for row in probs]
    return Reference(labels, pixels.numpy(), rows, embeddings)


def transformers_reference(
    directory: Path, images: Sequence[Image.Image], embed: bool = False
) -> Reference:
    """The transformers presets as ``pipeline("image-classification")`` runs them, in fp32
    (without ``dtype`` the pipeline would run Freepik's bf16 weights in bf16)."""
    import torch
    import transformers

    pipe = transformers.pipeline("image-classification", model=str(directory), dtype=torch.float32)
    results = pipe(list(images), top_k=None)
    rows = [{r["label"]: float(r["score"]) for r in result} for result in results]
    pixels = pipe.image_processor(list(images), return_tensors="pt")["pixel_values"]
    embeddings = None
    if embed:
        model = pipe.model
        with torch.inference_mode():
            if hasattr(model, "timm_model"):
                timm_model = model.timm_model
                features = timm_model.forward_features(pixels)
                embeddings = timm_model.forward_head(features, pre_logits=True).numpy()
            else:
                # The CLS token after the final LayerNorm (not hidden_states[-1]).
                embeddings = model.vit(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    return Reference(config_labels(directory), pixels.numpy(), rows, embeddings)


def reference(
    preset: str, directory: Path, images: Sequence[Image.Image], embed: bool = False
) -> Reference:
    if preset == "marqo":
        return timm_reference(directory, images, embed)
    return transformers_reference(directory, images, embed)


# --------------------------------------------------------------------------- heads

# Where each preset's classifier head lives in its model.safetensors. Freepik's hub file has
# no ``timm_model.`` prefix (transformers adds it on load); the look-alike's save_pretrained
# writes it with the prefix, so both spellings are accepted.
HEAD_PREFIXES = {
    "marqo": ("head.",),
    "falconsai": ("classifier.",),
    "adamcodd": ("classifier.",),
    "freepik": ("timm_model.head.", "head."),
}


def file_head_prefix(preset: str, state: dict[str, Any]) -> str:
    found = [p for p in HEAD_PREFIXES[preset] if f"{p}weight" in state and f"{p}bias" in state]
    assert len(found) == 1, f"{preset}: head keys {HEAD_PREFIXES[preset]} not found once in file"
    return found[0]


def loaded_head(backend: Any) -> Any:
    """The classifier module inside modq's loaded model (``backend.model``)."""
    model = backend.model
    if hasattr(model, "timm_model"):  # transformers TimmWrapper (Freepik)
        return model.timm_model.head
    if hasattr(model, "classifier"):  # transformers ViT (Falconsai, AdamCodd)
        return model.classifier
    return model.head  # timm VisionTransformer (Marqo)


def assert_head_is_files_head(preset: str, directory: Path, backend: Any) -> None:
    """The trained head in model.safetensors is the head modq runs, bit for bit (a silently
    re-initialised head would score at random and no other check would notice)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    prefix = file_head_prefix(preset, state)
    head = loaded_head(backend)
    labels = backend.card.labels
    assert tuple(head.weight.shape) == (len(labels), backend.card.embedding_dim)
    # A zero head would make any re-initialisation look "equal"; the look-alikes' are random.
    assert float(state[prefix + "weight"].float().abs().max()) > 0.0
    for name in ("weight", "bias"):
        loaded = getattr(head, name).detach().cpu()
        stored = state[prefix + name]
        assert loaded.dtype == torch.float32  # modq runs fp32; bf16 -> fp32 is exact
        assert torch.equal(loaded, stored.to(loaded.dtype)), f"{preset}: head {name} differs"


# --------------------------------------------------------------------------- subprocesses

# Runs in a fresh interpreter so huggingface_hub sees the HF_HUB_* variables of the test.
HUB_PREDICT_SCRIPT = """
import json, sys
from PIL import Image
from worker.models.factory import create_backend
from worker.models.registry import resolve

spec, *paths = sys.argv[1:]
images = []
for path in paths:
    with Image.open(path) as image:
        images.append(image.convert("RGB"))
resolved = resolve(spec)
backend = create_backend(spec, precision="fp32")
outputs = backend.predict(images)
print(__MARKER__ + json.dumps({
    "path": str(resolved.path),
    "revision": resolved.revision,
    "card_id": backend.card.id,
    "labels": list(backend.card.labels),
    "probabilities": [o.scores.probabilities for o in outputs],
    "nsfw_score": [o.scores.nsfw_score for o in outputs],
}))
""".replace("__MARKER__", repr(RESULT_MARKER))

RESOLVE_ERROR_SCRIPT = """
import json, sys
from worker.errors import ModqError
from worker.models.factory import create_backend

results = []
for spec in sys.argv[1:]:
    try:
        backend = create_backend(spec)
    except ModqError as exc:
        results.append({"spec": spec, "type": type(exc).__name__, "code": exc.code,
                        "message": str(exc)})
    else:
        results.append({"spec": spec, "type": None, "code": None, "message": backend.describe()})
print(__MARKER__ + json.dumps(results))
""".replace("__MARKER__", repr(RESULT_MARKER))


def run_python_process(
    script: str, args: Sequence[str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``sys.executable -c`` in the current environment (the test sets
    HF_HUB_* with monkeypatch first), with this checkout first on the path."""
    env = dict(os.environ)
    # The same checkout as this test run, whatever the editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    return proc


def result_of(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a script printed after the marker; the script must have succeeded."""
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    assert len(lines) == 1, (
        f"no result line in output:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    return json.loads(lines[0][len(RESULT_MARKER) :])


def run_python(script: str, args: Sequence[str], timeout: float = 300) -> Any:
    """Run ``script`` in a fresh interpreter and return the JSON it printed."""
    return result_of(run_python_process(script, args, timeout))
