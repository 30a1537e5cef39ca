"""How stable a ranking is: the chance each head is in the top K under resampling D, and split-half
rank agreement (Spearman's correlation of the scores from two disjoint halves of D)."""
from __future__ import annotations

import numpy as np

from .bootstrap import resampled_means


def top_k_probability(deltas: np.ndarray, k: int, resamples: int, seed: int) -> np.ndarray:
    """Per head, the fraction of bootstrap resamples of D in which it is among the K best scores."""
    hits = np.zeros(deltas.shape[0])
    for means in resampled_means(deltas, resamples, seed):
        best = np.argsort(-means, axis=1, kind="stable")[:, :k]
        hits += np.bincount(best.reshape(-1), minlength=deltas.shape[0])
    return hits / resamples


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (what Spearman's correlation needs)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's of average ranks); NaN where either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def split_half(deltas: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores from two disjoint seeded halves of D (an odd image out is left out)."""
    n = deltas.shape[1]
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return deltas[:, order[:half]].mean(axis=1), deltas[:, order[half:2 * half]].mean(axis=1)
