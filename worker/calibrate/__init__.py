"""`modq calibrate`: choose a policy's thresholds on a team's own labelled images.

    labels.csv ─read─▶ images ─Pipeline (as scan/worker)─▶ nsfw_score ─sweep─▶ thresholds
                                                                        │
                        policy.json · report.json · pr_curve.png · roc_curve.png

Thresholds are chosen on raw scores, compared the way ``Policy.decide`` compares them, so
they transfer to the worker unchanged. Heavy libraries (scikit-learn, scipy, matplotlib and
the model runtimes) load only when a calibration runs.
"""

from worker.calibrate.dataset import LabelledImage, label_names, read_labels
from worker.calibrate.metrics import (
    MARGIN,
    Choice,
    Confusion,
    Operating,
    Sweep,
    Target,
    choose_thresholds,
    confusion_at,
    ranking_metrics,
    sweep,
)
from worker.calibrate.report import policy_document, policy_of, report_document, write_outputs
from worker.calibrate.run import Calibration, Request, analyse, calibrate, load_labels, make_target
from worker.calibrate.scoring import FailedImage, ScoredImage, ScoredSet, score_images
from worker.calibrate.temperature import (
    ECE_BINS,
    TemperatureFit,
    apply_temperature,
    ece,
    fit_temperature,
)

__all__ = [
    "ECE_BINS",
    "MARGIN",
    "Calibration",
    "Choice",
    "Confusion",
    "FailedImage",
    "LabelledImage",
    "Operating",
    "Request",
    "ScoredImage",
    "ScoredSet",
    "Sweep",
    "Target",
    "TemperatureFit",
    "analyse",
    "apply_temperature",
    "calibrate",
    "choose_thresholds",
    "confusion_at",
    "ece",
    "fit_temperature",
    "label_names",
    "load_labels",
    "make_target",
    "policy_document",
    "policy_of",
    "ranking_metrics",
    "read_labels",
    "report_document",
    "score_images",
    "sweep",
    "write_outputs",
]
