"""Evaluation metrics on class probabilities: accuracy, negative log-likelihood, expected calibration error."""
from __future__ import annotations

import numpy as np

EPS = 1e-12


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(axis=1) == np.asarray(labels)).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(label), with probabilities clamped at 1e-12."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, EPS, None)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins over (0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)
