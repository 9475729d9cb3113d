"""Whether a preset's weights are on this machine, without downloading anything."""

from __future__ import annotations

from worker.errors import ModqError
from worker.models.registry import Preset, check_weights, download_command, resolve
from worker.optional import missing_extra

__all__ = ["availability"]


def availability(preset: Preset) -> str:
    if preset.hub_id is None:
        try:
            resolve(preset.name)
        except ModqError as exc:
            return f"no: {exc}"
        return "yes (bundled)"
    from pathlib import Path

    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # a hub preset runs on torch: without the extra it cannot
        return f"no: {missing_extra(exc) or exc}"

    try:
        folder = snapshot_download(preset.hub_id, revision=preset.revision, local_files_only=True)
        check_weights(Path(folder))
    except (ModqError, Exception):
        return f"no: {download_command(preset.hub_id, preset.revision)}"
    return "yes (hub cache)"
