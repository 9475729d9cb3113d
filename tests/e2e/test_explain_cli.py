"""`modq explain` as a user runs it: a subprocess on the bundled model, checked against the
library in-process (same score, same heatmap), and the `[code] message` of bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.cli import run_modq
from tests.support.corpus import EXAMPLES
from worker.config import Settings
from worker.explain import create_explainer
from worker.models.factory import create_backend

TIMEOUT = 180
REPO = Path(__file__).resolve().parents[2]


def _explain(
    tmp: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_modq("explain", *args, cwd=tmp, cache_home=tmp / "cache", timeout=TIMEOUT, env=env)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A non-square JPEG (open_nsfw squashes and centre-crops it)."""
    with Image.open(EXAMPLES / "cameraman.jpg") as image:
        wide = image.convert("RGB").resize((420, 260))
    path = tmp_path / "in" / "cameraman-wide.jpg"
    path.parent.mkdir()
    wide.save(path, format="JPEG", quality=92)
    return path


def test_explain_writes_an_overlay_of_the_images_size(tmp_path: Path, photo: Path) -> None:
    out, raw = tmp_path / "out" / "heat.png", tmp_path / "heat.npy"
    proc = _explain(tmp_path, photo, "--out", out, "--raw", raw, "--alpha", "0.5")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as written:
        assert (written.format, written.size, written.mode) == ("PNG", (420, 260), "RGB")
    assert "method: grad_cam on a 7x7 grid; target: log-odds of nsfw" in proc.stdout

    # The same score and heatmap as the library gives in-process on the decoded image.
    from worker.cli.explain import read_image

    image = read_image(photo, Settings())
    backend = create_backend("opennsfw")
    expected_score = backend.predict([image])[0].scores.nsfw_score
    match = re.search(r"nsfw_score: ([0-9.]+)", proc.stdout)
    assert match is not None, proc.stdout
    assert float(match.group(1)) == pytest.approx(expected_score, abs=1e-6)
    explainer = create_explainer(backend)
    heatmap = explainer.explain(image)
    np.testing.assert_allclose(np.load(raw), heatmap.values, atol=1e-6)
    with Image.open(out) as written:
        expected = np.asarray(explainer.overlay(image, heatmap, alpha=0.5), dtype=np.int16)
        assert np.abs(np.asarray(written, dtype=np.int16) - expected).max() <= 1


def test_bad_input_is_a_code_and_exit_2_never_a_traceback(tmp_path: Path, photo: Path) -> None:
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo.read_bytes()[:600])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    cases = [
        (tmp_path / "missing.jpg", {}, "not_found"),
        (truncated, {}, "corrupt_image"),
        (not_an_image, {}, "unsupported_format"),
        (photo, {"MODQ_MAX_IMAGE_BYTES": "1000"}, "image_too_large"),
    ]
    for path, env, code in cases:
        out = tmp_path / f"{code}.png"
        proc = _explain(tmp_path, path, "--out", out, env=env)
        assert proc.returncode == 2, (code, proc.stdout, proc.stderr)
        assert f"[{code}]" in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()
    proc = _explain(tmp_path, photo, "--out", tmp_path / "x.png", "--alpha", "1.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # typer's range check


def test_explaining_with_the_bundled_model_needs_no_torch(tmp_path: Path, photo: Path) -> None:
    """open_nsfw runs on ONNX Runtime alone, and so does its Grad-CAM."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from worker.cli.explain import read_image\n"
        "from worker.config import Settings\n"
        "from worker.explain import create_explainer\n"
        "from worker.models.factory import create_backend\n"
        "image = read_image(Path(sys.argv[1]), Settings())\n"
        "explainer = create_explainer(create_backend('opennsfw'))\n"
        "explainer.overlay(image, explainer.explain(image))\n"
        "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(photo)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
