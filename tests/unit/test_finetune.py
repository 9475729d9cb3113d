"""`modq finetune` as a library: it learns what the base model's head cannot already tell
apart, writes a model `--model DIR` reloads with identical scores, and refuses bad datasets.

The dataset is two classes of generated patterns: random per-pixel noise over a random base
colour, pushed warm (the ``nsfw`` folder) or cool (``safe``). Random-weight look-alikes and
open_nsfw alike carry colour in their pre-logits features, while an untrained head reads
them at chance; a trained head must separate them.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.models._support import require_torch_stack
from worker.errors import ConfigError, InvalidDataset, ModelConfigError
from worker.finetune import FinetuneOptions, FinetuneResult, ReadOptions, finetune
from worker.finetune.data import scan_dataset, stratified_split
from worker.finetune.train import MIN_DELTA
from worker.models.factory import build_card, create_backend
from worker.models.registry import resolve

SIZE = 64
LABELS = ("nsfw", "safe")  # sorted folder names: index 0 is nsfw


def pattern(rng: np.random.Generator, warm: bool) -> Image.Image:
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.float32) * 0.3
    pixels += rng.integers(0, 256, 3).astype(np.float32) * 0.5
    pixels[..., 0 if warm else 2] += 90.0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_pattern_dataset(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    """``root/nsfw`` (warm) and ``root/safe`` (cool), ``per_class`` PNGs each."""
    rng = np.random.default_rng(seed)
    for label in LABELS:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern(rng, warm=label == "nsfw").save(folder / f"{i:03d}.png")
    return root


def load_rgb(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_dataset(tmp_path_factory.mktemp("patterns"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny("marqo")``: the directory of a tiny random-weight look-alike, built once."""
    built: dict[str, str] = {}

    def get(preset: str) -> str:
        if preset not in built:
            require_torch_stack()
            from worker.models.lookalike import build_lookalike

            out = tmp_path_factory.mktemp(f"{preset}-tiny")
            built[preset] = str(build_lookalike(preset, out, seed=21, tiny=True))
        return built[preset]

    return get


def base_spec(name: str, tiny: Callable[[str], str]) -> str:
    return "opennsfw" if name == "opennsfw" else tiny(name)


def options(model: str, **overrides: Any) -> FinetuneOptions:
    return FinetuneOptions(model=model, device="cpu", **overrides)


def probabilities(backend: Any, images: list[Image.Image]) -> np.ndarray:
    return np.array(
        [[o.scores.probabilities[label] for label in LABELS] for o in backend.predict(images)]
    )


def check_learned_and_reloads(result: FinetuneResult) -> None:
    """The claims every mode must meet, checked on the written files themselves."""
    history = result.history
    metrics = json.loads((result.out / "metrics.json").read_text())
    # Honest before/after: epoch 0 is the untrained (zero) head on the validation set,
    # uniform probabilities, so its loss is ln 2 and its accuracy chance.
    assert metrics["epochs"][0]["train_loss"] is None
    assert metrics["epochs"][0]["val_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["epochs"][0]["val_accuracy"] < 0.7
    assert metrics["best"]["val_accuracy"] >= 0.9
    assert metrics["best_epoch"] == history.best_epoch >= 1
    assert [e["val_loss"] for e in metrics["epochs"]] == [e.val_loss for e in history.epochs]
    assert (result.out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == len(result.val_files)

    reloaded = create_backend(str(result.out), precision="fp32")
    assert reloaded.card.labels == LABELS
    assert reloaded.card.unsafe_labels == ("nsfw",)
    assert reloaded.card.id == f"local:{result.out.name}"
    val_images = load_rgb(result.val_files)
    written = probabilities(reloaded, val_images)
    in_memory = probabilities(result.backend, val_images)
    np.testing.assert_allclose(written, in_memory, rtol=0, atol=2e-6)
    for output in reloaded.predict(val_images[:4]):
        assert output.scores.nsfw_score == pytest.approx(output.scores.probabilities["nsfw"])

    # The reloaded model itself classifies the held-out files, and its loss on them is the
    # kept epoch's: the best epoch's weights were written, not the last epoch's.
    truth = np.array([LABELS.index(path.parent.name) for path in result.val_files])
    assert float((written.argmax(axis=1) == truth).mean()) >= 0.9
    loss = float(-np.log(written[np.arange(len(truth)), truth]).mean())
    assert loss == pytest.approx(history.best.val_loss, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("base", ["marqo", "falconsai", "opennsfw"])
def test_head_mode_learns_and_reloads_with_identical_scores(
    base: str, dataset: Path, tiny: Callable[[str], str], tmp_path: Path
) -> None:
    result = finetune(dataset, tmp_path / "model", options(base_spec(base, tiny)))
    check_learned_and_reloads(result)
    config_file = result.out / "config.json"
    if base == "opennsfw":
        assert sorted(p.name for p in result.out.iterdir()) == [
            "confusion_matrix.png",
            "metrics.json",
            "model.onnx",
        ]
        by_file = create_backend(str(result.out / "model.onnx"))
        assert by_file.card.labels == LABELS and by_file.card.unsafe_labels == ("nsfw",)
        assert not config_file.exists()
        return
    config = json.loads(config_file.read_text())
    assert config["modq"]["unsafe_labels"] == ["nsfw"]
    assert config["modq"]["mode"] == "head"
    if base == "marqo":  # timm layout: the base's pretrained_cfg kept
        assert config["num_classes"] == 2 and config["label_names"] == list(LABELS)
        assert config["pretrained_cfg"]["input_size"] == [3, 384, 384]
    else:  # transformers layout
        assert config["id2label"] == {"0": "nsfw", "1": "safe"}
        assert (result.out / "preprocessor_config.json").is_file()


def test_full_mode_learns_and_reloads_with_identical_scores(
    dataset: Path, tiny: Callable[[str], str], tmp_path: Path
) -> None:
    base = tiny("falconsai")
    result = finetune(dataset, tmp_path / "model", options(base, mode="full"))
    check_learned_and_reloads(result)
    assert json.loads((result.out / "config.json").read_text())["modq"]["mode"] == "full"
    # Every weight moved, not only the head.
    from safetensors.torch import load_file

    before = load_file(str(Path(base) / "model.safetensors"))
    after = load_file(str(result.out / "model.safetensors"))
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    assert not np.allclose(before[key].numpy(), after[key].numpy())


def test_full_mode_on_onnx_is_refused_before_anything_is_written(
    dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelConfigError, match=r"cannot train.*torch"):
        finetune(dataset, tmp_path / "model", options("opennsfw", mode="full"))
    assert not any(tmp_path.iterdir())


def test_early_stopping_keeps_the_best_epoch(dataset: Path, tmp_path: Path) -> None:
    result = finetune(dataset, tmp_path / "model", options("opennsfw", patience=2))
    history = result.history
    losses = [e.val_loss for e in history.epochs[1:]]
    assert history.best.val_loss == min(losses)
    assert history.stopped_early == (len(losses) < 100)
    if history.stopped_early:
        # The last two epochs brought no drop beyond MIN_DELTA below everything before them.
        assert min(losses[-2:]) >= min(losses[:-2]) - MIN_DELTA


def test_embeddings_are_cached_by_model_and_file(
    dataset: Path, tiny: Callable[[str], str], tmp_path: Path
) -> None:
    cache = tmp_path / "embeddings.sqlite3"
    first = finetune(dataset, tmp_path / "a", options("opennsfw", embedding_cache=cache))
    second = finetune(dataset, tmp_path / "b", options("opennsfw", embedding_cache=cache))
    assert (first.from_cache, second.from_cache) == (0, 80)
    assert [e.val_loss for e in first.history.epochs] == [e.val_loss for e in second.history.epochs]
    images = load_rgb(first.val_files)
    np.testing.assert_array_equal(
        probabilities(first.backend, images), probabilities(second.backend, images)
    )
    other = finetune(dataset, tmp_path / "c", options(tiny("falconsai"), embedding_cache=cache))
    assert other.from_cache == 0  # another model's entries are never used


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    data = write_pattern_dataset(tmp_path / "data", per_class=6)
    (data / "nsfw" / "truncated.png").write_bytes((data / "nsfw" / "000.png").read_bytes()[:200])
    (data / "safe" / "text.jpg").write_text("not an image")
    result = finetune(data, tmp_path / "model", options("opennsfw", epochs=2))
    assert result.images == 14
    assert sorted((s.path.name, s.code) for s in result.skipped) == [
        ("text.jpg", "unsupported_format"),
        ("truncated.png", "corrupt_image"),
    ]
    metrics = json.loads((result.out / "metrics.json").read_text())
    assert sorted(s["file"] for s in metrics["skipped"]) == ["nsfw/truncated.png", "safe/text.jpg"]
    assert sum(c["train"] + c["val"] for c in metrics["counts"].values()) == 12


def test_too_many_unreadable_images_refuse_the_dataset(tmp_path: Path) -> None:
    data = write_pattern_dataset(tmp_path / "data", per_class=4)
    for i in range(3):
        (data / "safe" / f"broken-{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    read = ReadOptions(max_unreadable=2)
    with pytest.raises(InvalidDataset, match="3 images could not be read"):
        finetune(data, tmp_path / "model", options("opennsfw", read=read))
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        ({"nsfw": 3}, "1 label folder"),
        ({"nsfw": 3, "safe": 0}, "'safe' holds no image files"),
        ({"nsfw": 1, "safe": 3}, "'nsfw' has 1 readable image"),
        ({"cats": 3, "dogs": 3}, "--unsafe-label"),
    ],
)
def test_bad_datasets_are_refused_with_a_clear_message(
    folders: dict[str, int], message: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    for label, count in folders.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(count):
            pattern(rng, warm=True).save(tmp_path / "data" / label / f"{i}.png")
    with pytest.raises(InvalidDataset, match=message):
        finetune(tmp_path / "data", tmp_path / "model", options("opennsfw"))


def test_any_label_set_with_a_named_unsafe_label(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_pattern_dataset(data, per_class=8)
    (data / "nsfw").rename(data / "weapons")
    (data / "safe").rename(data / "kitchen")
    with pytest.raises(InvalidDataset, match="no such label folder"):
        finetune(data, tmp_path / "m", options("opennsfw", unsafe_labels=("guns",)))
    result = finetune(
        data, tmp_path / "model", options("opennsfw", unsafe_labels=("weapons",), epochs=3)
    )
    card = create_backend(str(result.out)).card
    assert card.labels == ("kitchen", "weapons")
    assert card.unsafe_labels == ("weapons",)
    output = create_backend(str(result.out)).predict(load_rgb(result.val_files[:1]))[0]
    assert output.scores.nsfw_score == pytest.approx(output.scores.probabilities["weapons"])


def test_an_existing_model_is_replaced_only_when_forced(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    finetune(dataset, out, options("opennsfw", epochs=1))
    with pytest.raises(ConfigError, match="--force"):
        finetune(dataset, out, options("opennsfw", epochs=1))
    finetune(dataset, out, options("opennsfw", epochs=2, force=True))
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 3


def test_the_card_honours_and_checks_the_modq_block(
    tiny: Callable[[str], str], tmp_path: Path
) -> None:
    base = Path(shutil.copytree(tiny("falconsai"), tmp_path / "model"))
    config = json.loads((base / "config.json").read_text())
    config["id2label"] = {"0": "cats", "1": "dogs"}
    config["label2id"] = {"cats": 0, "dogs": 1}
    for block, expected in (
        ({"unsafe_labels": ["dogs"]}, ("dogs",)),
        ({"unsafe_labels": ["wolves"]}, "not among"),
        ({"unsafe_labels": "dogs"}, "must be a list"),
        ({}, "no label among"),
    ):
        (base / "config.json").write_text(json.dumps({**config, "modq": block}))
        if isinstance(expected, tuple):
            assert build_card(resolve(str(base))).unsafe_labels == expected
        else:
            with pytest.raises(ModelConfigError, match=expected):
                build_card(resolve(str(base)))


def test_the_split_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    labels = np.array([0] * 50 + [1] * 10 + [2] * 3)
    names = ("a", "b", "c")
    train, val = stratified_split(labels, names, 0.2, seed=7)
    assert sorted([*train, *val]) == list(range(len(labels)))
    assert np.bincount(labels[val]).tolist() == [10, 2, 1]
    again = stratified_split(labels, names, 0.2, seed=7)
    other = stratified_split(labels, names, 0.2, seed=8)
    assert np.array_equal(val, again[1]) and not np.array_equal(val, other[1])
    with pytest.raises(InvalidDataset, match="between 0 and 1"):
        stratified_split(labels, names, 1.0, seed=0)
    data = write_pattern_dataset(tmp_path / "d", per_class=2)
    assert scan_dataset(data).counts() == {"nsfw": 2, "safe": 2}
