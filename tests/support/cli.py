"""`modq` as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["MODQ", "TIMEOUT", "modq_env", "run_modq"]

MODQ = Path(sys.executable).parent / "modq"
TIMEOUT = 180


def modq_env(cache_home: Path) -> dict[str, str]:
    """This environment without MODQ_ and HF_ settings, its caches under ``cache_home``, and
    no Redis: the machine's own Redis (the built-in default) is never read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODQ_", "HF_"))}
    env.update(
        MODQ_CACHE_URL="",
        XDG_CACHE_HOME=str(cache_home),
        HF_HOME=str(cache_home / "huggingface"),
        HF_HUB_OFFLINE="1",
        COLUMNS="400",  # rich wraps at the terminal width; keep the summary on one line each
        NO_COLOR="1",
    )
    return env


def run_modq(
    *args: str | Path,
    cwd: Path,
    cache_home: Path,
    timeout: float = TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``modq ARGS`` in ``cwd``; ``env`` is laid over the clean environment."""
    assert MODQ.is_file(), f"the modq console script is not installed next to {sys.executable}"
    return subprocess.run(
        [str(MODQ), *map(str, args)],
        cwd=cwd,
        env={**modq_env(cache_home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
