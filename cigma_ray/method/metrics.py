"""Evaluation metrics on class probabilities (accuracy, negative log-likelihood, expected calibration
error) and a bootstrap over images for any metric written as a function of per-image weights."""
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


def bootstrap(statistics: dict[str, Callable[[np.ndarray], np.ndarray]], n: int, resamples: int, ci_level: float,
              seed: int) -> dict[str, tuple[float, float, float]]:
    """(point, low, high) of each statistic of n images, with a percentile interval over resamples of the images.

    A statistic maps image weights (m, n) to m values: the point estimate is its value with unit weights,
    a resample is a row of counts. Every statistic sees the same seeded resamples, so metrics computed on
    the same images (an intact and a pruned model, say) are paired. NaN resamples are left out; the
    interval is NaN without resamples.
    """
    points = {name: float(f(np.ones((1, n)))[0]) for name, f in statistics.items()}
    if resamples == 0 or n == 0:
        return {name: (p, float("nan"), float("nan")) for name, p in points.items()}
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    block = max(1, 2**22 // n)  # resamples per matrix product: ~32 MB of counts
    for start in range(0, resamples, block):
        counts = np.stack([np.bincount(rng.integers(0, n, size=n), minlength=n)
                           for _ in range(min(block, resamples - start))]).astype(np.float64)
        for name, f in statistics.items():
            values[name].append(f(counts))
    alpha = (1 - ci_level) / 2
    out = {}
    for name, chunks in values.items():
        v = np.concatenate(chunks)
        v = v[np.isfinite(v)]
        low, high = np.quantile(v, [alpha, 1 - alpha]) if len(v) else (float("nan"), float("nan"))
        out[name] = (points[name], float(low), float(high))
    return out
