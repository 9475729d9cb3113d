"""What a calibration writes: ``policy.json`` for the worker, ``report.json`` with every
number and per-image score, and the two charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.calibrate.metrics import Operating
from worker.calibrate.plots import plot_pr, plot_roc
from worker.calibrate.run import Calibration
from worker.calibrate.temperature import ECE_BINS, apply_temperature
from worker.errors import ConfigError
from worker.policy import Policy

__all__ = ["POLICY_NAME", "policy_document", "policy_of", "report_document", "write_outputs"]

POLICY_NAME = "calibrated"


def policy_of(calibration: Calibration) -> Policy:
    choice = calibration.choice
    return Policy(POLICY_NAME, choice.review.threshold, choice.block.threshold)


def _point(point: Operating) -> dict[str, Any]:
    c = point.confusion
    return {
        "threshold": point.threshold,
        "precision": c.precision,
        "recall": c.recall,
        "f1": c.f1,
        "false_positive_rate": c.false_positive_rate,
        "confusion": {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn},
    }


def _summary(calibration: Calibration) -> dict[str, Any]:
    """What policy.json and report.json share: where the thresholds came from."""
    scored = calibration.scored
    labels = calibration.labels
    choice = calibration.choice
    return {
        "model": scored.model.model_dump(),
        "exact_decode": scored.exact_decode,
        "labels_file": str(calibration.request.labels_csv),
        "target": {
            "kind": choice.target.kind,
            "value": choice.target.value,
            "met": choice.met,
        },
        "review_recall": choice.review_recall,
        "n": {
            "scored": len(labels),
            "unsafe": int(labels.sum()),
            "safe": int(len(labels) - labels.sum()),
            "left_out": len(scored.failed),
        },
        "metrics": {
            "roc_auc": calibration.roc_auc,
            "average_precision": calibration.average_precision,
            "block": _point(choice.block),
            "review": _point(choice.review),
        },
    }


def policy_document(calibration: Calibration) -> dict[str, Any]:
    """``load_policy`` reads name, review_at and block_at; the rest records the provenance."""
    policy = policy_of(calibration)
    return {
        "name": policy.name,
        "review_at": policy.review_at,
        "block_at": policy.block_at,
        "created_by": "modq calibrate",
        **_summary(calibration),
    }


def report_document(calibration: Calibration) -> dict[str, Any]:
    policy = policy_of(calibration)
    fit = calibration.temperature
    scores = calibration.scores
    calibrated = apply_temperature(scores, fit.temperature).tolist() if fit else None
    images = [
        {
            "path": item.image.name,
            "line": item.image.line,
            "label": item.image.label,
            "score": item.score,
            "verdict": policy.decide(item.score).value,
            **({"calibrated_score": calibrated[i]} if calibrated is not None else {}),
        }
        for i, item in enumerate(calibration.scored.scored)
    ]
    table = calibration.sweep
    return {
        "policy": {"name": policy.name, "review_at": policy.review_at, "block_at": policy.block_at},
        **_summary(calibration),
        "temperature": _temperature(calibration),
        "curve": {
            "thresholds": table.thresholds.tolist(),
            "precision": table.precision.tolist(),
            "recall": table.recall.tolist(),
            "f1": table.f1.tolist(),
            "false_positive_rate": table.false_positive_rate.tolist(),
        },
        "images": images,
        "left_out": [
            {
                "path": failed.image.name,
                "line": failed.image.line,
                "label": failed.image.label,
                "code": failed.code,
                "message": failed.message,
            }
            for failed in calibration.scored.failed
        ],
    }


def _temperature(calibration: Calibration) -> dict[str, Any] | None:
    fit = calibration.temperature
    if fit is None:
        return None
    policy = policy_of(calibration)
    at = apply_temperature(np.array([policy.review_at, policy.block_at]), fit.temperature)
    return {
        "temperature": fit.temperature,
        "ece_bins": ECE_BINS,
        "ece_before": fit.ece_before,
        "ece_after": fit.ece_after,
        "nll_before": fit.nll_before,
        "nll_after": fit.nll_after,
        "at_bound": fit.at_bound,
        "applied_by_worker": False,
        "review_at_probability": float(at[0]),
        "block_at_probability": float(at[1]),
    }


def _write_json(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path


def write_outputs(calibration: Calibration, out: Path) -> list[Path]:
    """Write everything into ``out``. ``policy.json`` only when the target was met: a stale
    one from an earlier run is removed, so nothing deploys thresholds that miss the target."""
    try:
        return _write_all(calibration, out)
    except OSError as exc:
        raise ConfigError(f"cannot write the calibration into {out}: {exc}") from exc


def _write_all(calibration: Calibration, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_json(out / "report.json", report_document(calibration)),
        plot_pr(
            calibration.sweep,
            calibration.choice,
            calibration.average_precision,
            out / "pr_curve.png",
        ),
        plot_roc(calibration.sweep, calibration.choice, calibration.roc_auc, out / "roc_curve.png"),
    ]
    policy_file = out / "policy.json"
    if calibration.choice.met:
        written.insert(0, _write_json(policy_file, policy_document(calibration)))
    else:
        policy_file.unlink(missing_ok=True)
    return written
