"""Evaluation metrics on class probabilities: accuracy, negative log-likelihood, expected calibration
error, and the same three as functions of per-image weights (for `bootstrap.bootstrap`)."""
from __future__ import annotations

from typing import Callable

import numpy as np

EPS = 1e-12


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(axis=1) == np.asarray(labels)).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(label), with probabilities clamped at 1e-12."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, EPS, None)).mean())


def confidence_bins(conf: np.ndarray, bins: int = 15) -> np.ndarray:
    """Bin of each confidence: equal-width bins over (0, 1], bin b holding (b/bins, (b+1)/bins] (0 goes to bin 0)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)


def weighted_ece(conf: np.ndarray, correct: np.ndarray, weights: np.ndarray, bins: int = 15) -> np.ndarray:
    """ECE under per-image weights (m, n) -> (m,): sum over bins of |weighted sum of (correct - conf)| / total weight.

    With unit weights this is the usual sum_b (n_b / n) |acc_b - conf_b|; a bootstrap resample is a row
    of counts, so many resamples are one matrix product.
    """
    conf = np.asarray(conf, dtype=np.float64)
    gaps = np.zeros((len(conf), bins))
    gaps[np.arange(len(conf)), confidence_bins(conf, bins)] = np.asarray(correct, dtype=np.float64) - conf
    return np.abs(weights @ gaps).sum(axis=1) / weights.sum(axis=1)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins over (0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    correct = p.argmax(axis=1) == np.asarray(labels)
    return float(weighted_ece(p.max(axis=1), correct, np.ones((1, len(p))), bins)[0])


def prediction_statistics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Accuracy, NLL and ECE as functions of per-image weights (m, n) -> (m,), for `bootstrap.bootstrap`."""
    p = np.asarray(probs, dtype=np.float64)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    loss = -np.log(np.clip(p[np.arange(len(labels)), labels], EPS, None))
    conf = p.max(axis=1)
    return {"accuracy": lambda w: w @ correct / w.sum(axis=1), "nll": lambda w: w @ loss / w.sum(axis=1),
            "ece": lambda w: weighted_ece(conf, correct, w)}
