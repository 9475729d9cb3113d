"""Temperature scaling of ``nsfw_score``, and the expected calibration error.

The worker compares raw scores with the policy's thresholds; a fitted temperature only tells
a reader how to turn a raw score into a probability for this kind of data:
``p = sigmoid(logit(score) / T)``. T > 1 means the model is over-confident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.errors import MissingExtra

__all__ = ["ECE_BINS", "TemperatureFit", "apply_temperature", "ece", "fit_temperature", "logit"]

ECE_BINS = 15
# float32 scores reach exactly 0 and 1; clipping keeps their logits finite (about ±27.6).
_EPS = 1e-12
_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    #: the search stopped at its bound (0.01 or 100): a set the model separates perfectly
    #: drives T towards 0, and the fitted value then means little
    at_bound: bool = False


def logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
    return np.asarray(np.log(p) - np.log1p(-p), dtype=np.float64)


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-logit(scores) / temperature)), dtype=np.float64)


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(unsafe): over equal-width bins of the score, the
    share-weighted gap between the mean score and the fraction of unsafe images."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(p[members].mean() - y[members].mean())
    return float(total)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    # -log sigmoid(z) for positives, -log(1 - sigmoid(z)) for negatives, without overflow.
    return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The T minimising the negative log-likelihood of the labels (one parameter, so a
    bounded 1-D search on log T finds it)."""
    try:
        from scipy.optimize import minimize_scalar
    except ImportError as exc:
        raise MissingExtra("--temperature needs scipy: pip install 'modq[analysis]'") from exc
    logits = logit(scores)
    y = np.asarray(labels)
    found = minimize_scalar(
        lambda log_t: _nll(logits, y, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(np.exp(found.x))
    return TemperatureFit(
        temperature,
        ece(scores, y),
        ece(apply_temperature(scores, temperature), y),
        _nll(logits, y, 1.0),
        _nll(logits, y, temperature),
        bool(min(abs(found.x - bound) for bound in _LOG_T_BOUNDS) < 1e-3),
    )
