"""`modq calibrate` end to end: a labelled folder of generated images scored by the real
bundled model (and by a hub look-alike), then the thresholds checked against the worker's own
``Policy.decide`` on independently computed scores, and against `modq scan --policy`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.support.cli import run_modq
from worker.calibrate import MARGIN
from worker.decode import DecodeLimits, decode
from worker.models.backend import Backend
from worker.models.preprocess import draft_size
from worker.policy import Policy, load_policy

TIMEOUT = 300
IMAGES = 12


def _calibrate(tmp: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_modq("calibrate", *args, cwd=tmp, cache_home=tmp / "cache", timeout=TIMEOUT)


def _shapes(rng: np.random.Generator, size: tuple[int, int], skin: bool) -> Image.Image:
    """Skin-toned blobs or random colours, with noise: the bundled model scores the former
    higher, so the labels below mean something to it."""

    def colour() -> tuple[int, int, int]:
        if skin:
            return (
                200 + int(rng.integers(0, 40)),
                140 + int(rng.integers(0, 40)),
                110 + int(rng.integers(0, 40)),
            )
        r, g, b = (int(v) for v in rng.integers(0, 256, 3))
        return r, g, b

    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    w, h = size
    for _ in range(5):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        draw.ellipse(
            (x, y, x + int(rng.integers(20, w // 2)), y + int(rng.integers(20, h // 2))),
            fill=colour(),
        )
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels file with every accepted spelling, a header, relative and absolute paths,
    JPEG and PNG, one large JPEG (draft-decoded at half size) and one corrupt file."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(3)
    spellings = [
        ("1", "0"),
        ("unsafe", "safe"),
        ("NSFW", "sfw"),
        ("block", "Allow"),
        ("true", "FALSE"),
    ]
    rows = ["path,label"]
    for i in range(IMAGES):
        unsafe = i % 2 == 0
        size = (1600, 1200) if i == 4 else (160 + 8 * i, 120)
        name = f"imgs/img{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        _shapes(rng, size, unsafe).save(root / name)
        path = str(root / name) if i == 5 else name
        rows.append(f"{path},{spellings[i % 5][0 if unsafe else 1]}")
    (root / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append("imgs/broken.jpg,unsafe")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _independent_scores(backend: Backend, folder: Path, names: list[str]) -> dict[str, float]:
    """Each image decoded with scan's limits and draft size, scored alone by ``predict``."""
    scores = {}
    for name in names:
        decoded = decode((folder / name).read_bytes(), DecodeLimits(), draft_size(backend.card))
        outputs = backend.predict(list(decoded.frames))
        scores[name] = max(output.scores.nsfw_score for output in outputs)
    return scores


def _check_policy_matches_report(out: Path, backend: Backend, folder: Path) -> Policy:
    report = _read(out / "report.json")
    policy = load_policy(str(out / "policy.json"), backend.card)
    assert (policy.review_at, policy.block_at) == (
        report["policy"]["review_at"],
        report["policy"]["block_at"],
    )
    names = [image["path"] for image in report["images"]]
    real = _independent_scores(backend, folder, names)
    for image in report["images"]:
        assert real[image["path"]] == pytest.approx(image["score"], abs=1e-5), image
        assert policy.decide(real[image["path"]]).value == image["verdict"], image
    block = report["metrics"]["block"]["confusion"]
    flagged = [image for image in report["images"] if image["verdict"] == "block"]
    assert block["tp"] == sum(image["label"] for image in flagged)
    assert block["fp"] == sum(1 - image["label"] for image in flagged)
    return policy


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300


@pytest.fixture(scope="module")
def opennsfw() -> Backend:
    from worker.models.precision import load_model

    return load_model("opennsfw", "cpu", "fp32")


@pytest.fixture(scope="module")
def opennsfw_run(
    labelled: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("calibration")
    return _calibrate(labelled, "labels.csv", "--temperature", "--out", out), out


def test_bundled_model_calibration_transfers_to_the_worker(
    opennsfw_run: tuple[subprocess.CompletedProcess[str], Path], labelled: Path, opennsfw: Backend
) -> None:
    done, out = opennsfw_run
    assert done.returncode == 0, done.stderr
    report = _read(out / "report.json")
    assert report["model"]["id"] == opennsfw.card.id
    assert report["n"] == {
        "scored": IMAGES,
        "unsafe": IMAGES // 2,
        "safe": IMAGES // 2,
        "left_out": 1,
    }
    assert [(x["path"], x["line"], x["code"]) for x in report["left_out"]] == [
        ("imgs/broken.jpg", IMAGES + 2, "corrupt_image")
    ]
    assert "left out: 1" in done.stdout and "corrupt_image" in done.stdout
    _check_policy_matches_report(out, opennsfw, labelled)
    # The report's figures are scikit-learn's on the per-image scores it lists.
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = [x["label"] for x in report["images"]]
    scores = [x["score"] for x in report["images"]]
    assert report["metrics"]["roc_auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert report["metrics"]["average_precision"] == pytest.approx(
        average_precision_score(labels, scores)
    )
    assert f"ROC-AUC {report['metrics']['roc_auc']:.4f}" in done.stdout
    temperature = report["temperature"]
    assert temperature["ece_bins"] == 15 and temperature["temperature"] > 0
    assert temperature["applied_by_worker"] is False
    for chart in ("pr_curve.png", "roc_curve.png"):
        _check_png(out / chart)
    policy = _read(out / "policy.json")
    assert policy["target"] == {"kind": "max_f1", "value": None, "met": True}


def test_scan_with_the_policy_file_gives_the_reported_verdicts(
    opennsfw_run: tuple[subprocess.CompletedProcess[str], Path], labelled: Path, tmp_path: Path
) -> None:
    done, out = opennsfw_run
    assert done.returncode == 0, done.stderr
    scan_report = tmp_path / "scan.jsonl"
    scanned = run_modq(
        "scan",
        labelled / "imgs",
        "--policy",
        out / "policy.json",
        "--no-cache",
        "--report",
        scan_report,
        cwd=tmp_path,
        cache_home=tmp_path / "cache",
        timeout=TIMEOUT,
    )
    assert scanned.returncode == 0, scanned.stderr
    verdicts = {
        Path(row["image"]).name: row["verdict"]
        for row in map(json.loads, scan_report.read_text().splitlines())
    }
    claimed = {Path(x["path"]).name: x["verdict"] for x in _read(out / "report.json")["images"]}
    assert len(claimed) == IMAGES
    assert {name: verdicts[name] for name in claimed} == claimed
    assert verdicts["broken.jpg"] is None


def test_unreachable_precision_writes_no_policy_and_exits_1(
    opennsfw_run: tuple[subprocess.CompletedProcess[str], Path], labelled: Path
) -> None:
    """Relabel the set so that its top-scoring image is safe: no threshold then reaches
    precision 1, whatever the model's scores are."""
    done, first = opennsfw_run
    assert done.returncode == 0, done.stderr
    images = _read(first / "report.json")["images"]
    top = max(images, key=lambda x: x["score"])
    rows = [
        f"{x['path']},{'safe' if x is top else 'unsafe' if x['label'] else 'safe'}" for x in images
    ]
    (labelled / "top-safe.csv").write_text("\n".join(rows) + "\n")
    out = labelled / "unreachable"
    out.mkdir()
    (out / "policy.json").write_text('{"name": "stale", "review_at": 0.1, "block_at": 0.2}')
    missed = _calibrate(labelled, "top-safe.csv", "--target-precision", "1", "--out", out)
    assert missed.returncode == 1, missed.stderr
    assert "target not met" in missed.stderr and "precision >= 1" in missed.stderr
    assert f"{out / 'policy.json'} was not written" in missed.stderr
    assert not (out / "policy.json").exists()
    as_json = _calibrate(
        labelled, "top-safe.csv", "--target-precision", "1", "--out", out, "--json"
    )
    assert as_json.returncode == 1, as_json.stderr
    document = json.loads(as_json.stdout)  # stdout holds the one JSON document, nothing else
    assert document["not_written"] == [str(out / "policy.json")]
    assert document["target"]["met"] is False and str(out / "report.json") in document["written"]
    report = _read(out / "report.json")
    assert report["target"] == {"kind": "precision", "value": 1.0, "met": False}
    assert report["metrics"]["block"]["precision"] < 1.0


def test_target_recall_blocks_every_unsafe_image(
    opennsfw_run: tuple[subprocess.CompletedProcess[str], Path], labelled: Path, opennsfw: Backend
) -> None:
    out = labelled / "recall"
    done = _calibrate(labelled, "labels.csv", "--target-recall", "1.0", "--out", out)
    assert done.returncode == 0, done.stderr
    policy = _check_policy_matches_report(out, opennsfw, labelled)
    report = _read(out / "report.json")
    unsafe = [x["score"] for x in report["images"] if x["label"] == 1]
    assert policy.block_at <= min(unsafe)
    # The highest such threshold: the lowest-scoring unsafe image sits right on it.
    assert min(unsafe) - policy.block_at <= MARGIN * (1 + 1e-6)
    assert report["metrics"]["block"]["recall"] == 1.0


@pytest.mark.parametrize(
    ("row", "line"),
    [("imgs/img01.jpg,perhaps", 3), ("imgs/nothere.jpg,1", 3), ("imgs/img01.jpg", 3)],
)
def test_malformed_labels_exit_2_naming_the_line(labelled: Path, row: str, line: int) -> None:
    (labelled / "bad.csv").write_text(f"path,label\nimgs/img00.png,1\n{row}\n")
    done = _calibrate(labelled, "bad.csv", "--out", labelled / "bad-out")
    assert done.returncode == 2
    assert "[invalid_dataset]" in done.stderr and f"line {line}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (labelled / "bad-out").exists()


def test_hub_lookalike_by_directory(labelled: Path, tmp_path: Path) -> None:
    """A tiny Falconsai look-alike (random weights, the hub layout), labelled with the
    model's own label names (normal / nsfw)."""
    pytest.importorskip("torch")
    from worker.models.factory import create_backend
    from worker.models.lookalike import build_lookalike

    model_dir = build_lookalike("falconsai", tmp_path / "falconsai", seed=5, tiny=True)
    names = [f"imgs/img{i:02d}.{'png' if i % 3 == 0 else 'jpg'}" for i in range(IMAGES)]
    rows = [f"{name},{'nsfw' if i % 3 else 'Normal'}" for i, name in enumerate(names)]
    (labelled / "falconsai.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    done = _calibrate(
        labelled, "falconsai.csv", "--model", model_dir, "--precision", "fp32", "--out", out
    )
    assert done.returncode == 0, done.stderr
    backend = create_backend(str(model_dir), precision="fp32")
    policy = _read(out / "policy.json")
    assert policy["model"]["id"] == backend.card.id
    assert policy["model"]["runtime"] == "transformers"
    assert policy["n"]["unsafe"] == 8 and policy["n"]["safe"] == 4
    _check_policy_matches_report(out, backend, labelled)
