"""`modq calibrate`'s arithmetic on hand-countable cases: ranking metrics, threshold choice
per target, labels files (and their rejections, by line), and temperature scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.calibrate import (
    MARGIN,
    Target,
    apply_temperature,
    choose_thresholds,
    confusion_at,
    ece,
    fit_temperature,
    label_names,
    make_target,
    ranking_metrics,
    read_labels,
    sweep,
)
from worker.errors import ConfigError, InvalidDataset
from worker.messages import Verdict
from worker.models.card import ModelCard
from worker.policy import Policy

# Six scores, ranked: 0.8 P, 0.65 P, 0.4 N, 0.35 P, 0.2 N, 0.1 N.
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.65, 0.2])
LABELS = np.array([0, 0, 1, 1, 1, 0])


# --------------------------------------------------------------------------- metrics


def test_roc_auc_and_average_precision_counted_by_hand() -> None:
    # ROC-AUC: of the 9 (unsafe, safe) pairs only (0.35, 0.4) is ranked the wrong way: 8/9.
    # AP: precision at each unsafe image, ranked: 1 (0.8), 1 (0.65), 3/4 (0.35); mean 11/12.
    roc_auc, average_precision = ranking_metrics(SCORES, LABELS)
    assert roc_auc == pytest.approx(8 / 9)
    assert average_precision == pytest.approx(11 / 12)


def test_roc_auc_counts_a_tie_as_half_a_pair() -> None:
    # Pairs: (0.3 vs 0.3) tie = 1/2, (0.3 vs 0.1) = 1, (0.9 vs 0.3) = 1, (0.9 vs 0.1) = 1.
    roc_auc, _ = ranking_metrics(np.array([0.3, 0.3, 0.9, 0.1]), np.array([1, 0, 1, 0]))
    assert roc_auc == pytest.approx(3.5 / 4)


def test_sweep_counts_match_hand_counts_and_scikit_learn() -> None:
    from sklearn.metrics import precision_recall_curve

    table = sweep(SCORES, LABELS)
    assert table.thresholds.tolist() == [0.8, 0.65, 0.4, 0.35, 0.2, 0.1]
    assert table.tp.tolist() == [1, 2, 2, 3, 3, 3]
    assert table.fp.tolist() == [0, 0, 1, 1, 2, 3]
    assert table.f1.tolist() == pytest.approx([0.5, 0.8, 2 / 3, 6 / 7, 0.75, 2 / 3])
    precision, recall, thresholds = precision_recall_curve(LABELS, SCORES)
    # scikit-learn's last (precision, recall) pair belongs to no threshold.
    ours = {
        float(t): (p, r)
        for t, p, r in zip(table.thresholds, table.precision, table.recall, strict=True)
    }
    assert set(thresholds.tolist()) == set(ours)
    for t, p, r in zip(thresholds, precision[:-1], recall[:-1], strict=True):
        assert ours[float(t)] == pytest.approx((p, r))


# --------------------------------------------------------------------------- thresholds


def _verdict_counts(policy: Policy, scores: np.ndarray) -> dict[Verdict, int]:
    verdicts = [policy.decide(float(s)) for s in scores]
    return {v: verdicts.count(v) for v in Verdict}


@pytest.mark.parametrize(
    ("target", "review_recall", "block_score", "review_score"),
    [
        # F1 per threshold: .5, .8, .67, .857 (0.35), .75, .67
        (Target("max_f1"), 0.95, 0.35, 0.35),
        # precision 1 holds down to 0.65; 0.4 lets a safe image in
        (Target("precision", 1.0), 0.95, 0.65, 0.35),
        # precision is not monotone: 0.4 gives 2/3, but 0.35 gives 3/4 again
        (Target("precision", 0.7), 0.95, 0.35, 0.35),
        (Target("recall", 0.6), 0.95, 0.65, 0.35),
        (Target("recall", 1.0), 0.95, 0.35, 0.35),
        # review at recall 0.5 is 0.65, the same as block_at
        (Target("precision", 1.0), 0.5, 0.65, 0.65),
        # review at recall 0.3 would be 0.8, above block_at: clamped to block_at
        (Target("precision", 1.0), 0.3, 0.65, 0.65),
    ],
)
def test_threshold_choice_per_target(
    target: Target, review_recall: float, block_score: float, review_score: float
) -> None:
    choice = choose_thresholds(SCORES, LABELS, target, review_recall)
    assert choice.met
    assert choice.block.threshold == pytest.approx(block_score - MARGIN, abs=1e-12)
    assert choice.review.threshold == pytest.approx(review_score - MARGIN, abs=1e-12)
    # The counts reported are the worker's own decisions with these thresholds.
    policy = Policy("t", choice.review.threshold, choice.block.threshold)
    counts = _verdict_counts(policy, SCORES)
    block = choice.block.confusion
    assert counts[Verdict.BLOCK] == block.tp + block.fp
    assert counts[Verdict.BLOCK] + counts[Verdict.REVIEW] == (
        choice.review.confusion.tp + choice.review.confusion.fp
    )


def test_reported_precision_and_recall_at_the_chosen_point() -> None:
    choice = choose_thresholds(SCORES, LABELS, Target("precision", 0.7), 0.95)
    c = choice.block.confusion
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 0, 2)
    assert (c.precision, c.recall, c.f1) == pytest.approx((0.75, 1.0, 6 / 7))


def test_unreachable_precision_is_reported_not_met() -> None:
    # The top score is a safe image: every threshold flags it, precision never exceeds 2/3.
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    labels = np.array([0, 1, 1, 0])
    choice = choose_thresholds(scores, labels, Target("precision", 0.9), 0.95)
    assert not choice.met
    assert choice.block.confusion.precision == pytest.approx(2 / 3)
    assert choice.block.threshold == pytest.approx(0.7 - MARGIN)
    assert choose_thresholds(scores, labels, Target("precision", 0.6), 0.95).met


def test_threshold_between_close_scores_keeps_every_verdict() -> None:
    # Two scores 1e-7 apart: the threshold goes halfway, not a full MARGIN below.
    scores = np.array([0.5, 0.5 - 1e-7, 0.2])
    labels = np.array([1, 0, 0])
    choice = choose_thresholds(scores, labels, Target("precision", 1.0), 0.95)
    assert 0.5 - 1e-7 < choice.block.threshold < 0.5
    assert confusion_at(scores, labels, choice.block.threshold) == choice.block.confusion
    assert (choice.block.confusion.tp, choice.block.confusion.fp) == (1, 0)


@pytest.mark.parametrize(
    ("precision", "recall", "message"),
    [(0.9, 0.9, "not both"), (0.0, None, "(0, 1]"), (None, 1.5, "(0, 1]")],
)
def test_bad_targets_are_config_errors(
    precision: float | None, recall: float | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        make_target(precision, recall)


# --------------------------------------------------------------------------- labels files


def _card(labels: tuple[str, ...], graded: bool = False) -> ModelCard:
    return ModelCard(
        id="test/model",
        revision="r",
        runtime="timm",
        labels=labels,
        input_size=32,
        crop="center",
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        embedding_dim=None,
        graded=graded,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "labels.csv"
    path.write_text(text)
    return path


def test_labels_file_spellings_header_and_paths(folder: Path) -> None:
    other = folder / "elsewhere"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "f.png")
    text = (
        "Path,Label\n"
        "a.png,1\n"
        " b.png , Unsafe \n"
        "\n"
        "c.png,SFW,a note the reader ignores\n"
        f"{other / 'f.png'},block\n"
        "d.png,false\n"
        "e.png,allow\n"
    )
    images = read_labels(_write(folder, text), label_names())
    assert [(i.name, i.label, i.line) for i in images] == [
        ("a.png", 1, 2),
        ("b.png", 1, 3),
        ("c.png", 0, 5),
        (str(other / "f.png"), 1, 6),
        ("d.png", 0, 7),
        ("e.png", 0, 8),
    ]
    assert all(i.path.is_absolute() and i.path.is_file() for i in images)


def test_model_label_names_follow_the_card(folder: Path) -> None:
    marqo_like = label_names(_card(("NSFW", "SFW")))
    images = read_labels(_write(folder, "a.png,nsfw\nb.png,Sfw\n"), marqo_like)
    assert [i.label for i in images] == [1, 0]
    falconsai_like = label_names(_card(("normal", "nsfw")))
    images = read_labels(_write(folder, "a.png,NORMAL\nb.png,nsfw\n"), falconsai_like)
    assert [i.label for i in images] == [0, 1]
    graded = label_names(_card(("neutral", "low", "medium", "high"), graded=True))
    images = read_labels(_write(folder, "a.png,neutral\nb.png,low\nc.png,high\n"), graded)
    assert [i.label for i in images] == [0, 1, 1]
    with pytest.raises(InvalidDataset, match="line 1: unknown label 'normal'"):
        read_labels(_write(folder, "a.png,normal\nb.png,nsfw\n"), label_names())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("path,label\na.png,1\nb.png,maybe\n", "line 3: unknown label 'maybe'"),
        ("a.png,1\nmissing.png,0\n", "line 2: no such file missing.png"),
        ("a.png,1\nb.png,0\nc.png\n", "line 3: expected two columns"),
        ("a.png,1\nb.png,0\n,1\n", "line 3: empty path"),
        ("a.png,1\nb.png,0\n./a.png,0\n", "line 3: ./a.png is already listed on line 1"),
        ("a.png,1\nb.png,nsfw\n", "every row up to line 2 is labelled unsafe"),
        ("path,label\n\n", "no labelled rows"),
        ('a.png,1\n"b.png,0\n', "line 2"),
    ],
)
def test_malformed_labels_files_name_the_line(folder: Path, text: str, fragment: str) -> None:
    with pytest.raises(InvalidDataset) as caught:
        read_labels(_write(folder, text), label_names())
    assert caught.value.code == "invalid_dataset"
    assert fragment in str(caught.value)


def test_unreadable_labels_file(folder: Path) -> None:
    path = folder / "labels.csv"
    path.write_bytes(b"a.png,1\n\xff\xfe\xfa,0\n")
    with pytest.raises(InvalidDataset, match="cannot read labels file"):
        read_labels(path, label_names())
    with pytest.raises(InvalidDataset, match="cannot read labels file"):
        read_labels(folder / "absent.csv", label_names())


# --------------------------------------------------------------------------- temperature


def test_ece_counted_by_hand() -> None:
    # Bin 1 (0.1): mean score 0.1, half unsafe: gap 0.4, weight 1/2. Bin 13 (0.9): gap 0.1.
    assert ece(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1])) == pytest.approx(0.25)
    # Scores equal to the fraction unsafe in every bin: perfectly calibrated.
    assert ece(np.array([0.5, 0.5, 1.0]), np.array([0, 1, 1])) == pytest.approx(0.0)


def _miscalibrated(sharpen: float, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the true probabilities sigmoid(z); scores sigmoid(sharpen * z), so
    dividing their logits by T = sharpen gives the true probabilities back."""
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return 1 / (1 + np.exp(-sharpen * z)), labels


@pytest.mark.parametrize("sharpen", [3.0, 0.5])
def test_temperature_scaling_recovers_the_temperature_and_lowers_ece(sharpen: float) -> None:
    scores, labels = _miscalibrated(sharpen)
    fit = fit_temperature(scores, labels)
    assert fit.temperature == pytest.approx(sharpen, rel=0.15)
    assert not fit.at_bound
    assert fit.ece_before > 0.05
    assert fit.ece_after < fit.ece_before / 2
    assert fit.nll_after < fit.nll_before
    calibrated = apply_temperature(scores, fit.temperature)
    assert fit.ece_after == pytest.approx(ece(calibrated, labels))
    # Monotone: the ranking, and so every threshold's verdicts, are unchanged.
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(scores, kind="stable"))


def test_temperature_of_a_separated_set_stops_at_the_bound() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    fit = fit_temperature(scores, np.array([0, 0, 0, 1, 1, 1]))
    assert fit.at_bound
    assert fit.temperature == pytest.approx(0.01, rel=1e-2)


def test_scores_of_exactly_zero_and_one_stay_finite() -> None:
    fit = fit_temperature(np.array([0.0, 1.0, 0.0, 1.0, 0.6]), np.array([0, 1, 1, 0, 1]))
    assert np.isfinite(fit.temperature) and np.isfinite(fit.nll_before)
