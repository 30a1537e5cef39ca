"""The bootstrap over images, in one place: seeded resamples as rows of counts.

A resample of n images is a row of counts (how often each image was drawn), so a statistic of a
resample is a count-weighted statistic, and a block of resamples is one matrix product. Every
interval in the project (scores, accuracy, BIR, NLL, ECE, top-K stability) draws its resamples
here, so two statistics with the same seed and images are paired.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

BLOCK_CELLS = 2**22  # counts per block: ~32 MB of float64


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (resamples, n) counts of seeded bootstrap resamples of n images, in order."""
    rng = np.random.default_rng(seed)
    block = max(1, BLOCK_CELLS // n)
    for start in range(0, resamples, block):
        yield np.stack([np.bincount(rng.integers(0, n, size=n), minlength=n)
                        for _ in range(min(block, resamples - start))]).astype(np.float64)


def resampled_means(deltas: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (resamples, heads) means of a (heads, images) matrix over seeded bootstrap resamples of
    the images, the same resamples for every head (1000 heads x 50k images x 1000 resamples in seconds)."""
    n = deltas.shape[1]
    for counts in resample_counts(n, resamples, seed):
        yield counts @ deltas.T / n


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
    values: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for counts in resample_counts(n, resamples, seed):
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
