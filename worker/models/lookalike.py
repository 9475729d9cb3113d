"""Random-weight look-alikes of the hub presets, in the exact on-disk layout.

They let tests and benchmarks run the real loading and scoring code where the real weights
cannot be downloaded: same architecture, same config files, same file names, random weights.
Scores from a look-alike mean nothing; speed and code paths are the real ones.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from worker.models.registry import PRESETS

__all__ = ["LOOKALIKE_PRESETS", "build_lookalike", "install_in_hub_cache"]

LOOKALIKE_PRESETS = ("marqo", "falconsai", "freepik", "adamcodd")

# AdamCodd's processor settings (MODELS.md: 384x384, mean = std = 0.5); the hub file is not
# among the copied configs, so the look-alike writes the ViT processor defaults at 384.
_ADAMCODD_PROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}


def _config_dir(preset: str) -> Path:
    return Path(str(resources.files("worker.models").joinpath("configs", preset)))


def build_lookalike(preset: str, out: Path, seed: int = 0, tiny: bool = False) -> Path:
    """Write a look-alike of ``preset`` into ``out``. ``tiny`` shrinks depth and width (same
    layout and preprocessing) for fast tests."""
    import torch

    from worker.models.torch_backend import _import_timm

    _import_timm()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    configs = _config_dir(preset)
    if preset == "marqo":
        _marqo(configs, out, tiny)
    elif preset == "freepik":
        _freepik(configs, out, tiny)
    elif preset in ("falconsai", "adamcodd"):
        _vit(configs, out, preset, tiny)
    else:
        raise ValueError(f"no look-alike for {preset!r}; choose from {LOOKALIKE_PRESETS}")
    return out


def _marqo(configs: Path, out: Path, tiny: bool) -> None:
    import timm
    from safetensors.torch import save_file

    config = json.loads((configs / "config.json").read_text())
    kwargs: dict[str, Any] = {"depth": 2} if tiny else {}
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=2, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    if tiny:
        config.setdefault("model_args", {})["depth"] = 2
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _vit(configs: Path, out: Path, preset: str, tiny: bool) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = json.loads((configs / "config.json").read_text())
    if tiny:
        config.update(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4
        )
    ViTForImageClassification(ViTConfig(**config)).save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    processor = configs / "preprocessor_config.json"
    if processor.is_file():
        shutil.copy(processor, out / "preprocessor_config.json")
    else:
        (out / "preprocessor_config.json").write_text(json.dumps(_ADAMCODD_PROCESSOR, indent=2))


def _freepik(configs: Path, out: Path, tiny: bool) -> None:
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config_text = (configs / "config.json").read_text()
    config = json.loads(config_text)
    if tiny:
        config["model_args"] = {"depth": 2}
        config_text = json.dumps(config, indent=2)
    staging = out / ".config"
    staging.mkdir(exist_ok=True)
    (staging / "config.json").write_text(config_text)
    cfg = TimmWrapperConfig.from_pretrained(str(staging))
    shutil.rmtree(staging)
    model = TimmWrapperForImageClassification(cfg).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(str(out))
    (out / "config.json").write_text(config_text)
    # Freepik's file stores plain timm keys; transformers adds the timm_model. prefix on load.
    from safetensors.torch import load_file, save_file

    weights = out / "model.safetensors"
    state = {k.removeprefix("timm_model."): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})


def install_in_hub_cache(source: Path, hub_cache: Path, repo: str, commit: str) -> Path:
    """Place ``source``'s files where huggingface_hub looks for ``repo`` at ``commit``."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            target = snapshot / item.name
            if not target.exists():
                target.symlink_to(item.resolve())
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def preset_commit(preset: str) -> str:
    """The pinned revision of a preset, or a made-up commit for an unpinned one."""
    return PRESETS[preset].revision or "0" * 40
