"""Per-head CIGMA scores: mean drop in BIG, its standard error, a seeded bootstrap interval, ranks."""
from __future__ import annotations

import numpy as np


def head_scores(deltas: np.ndarray, *, bootstrap: int = 1000, ci_level: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
    """Summaries of a (heads, images) matrix of BIG_i - BIG_i^(-h).

    The bootstrap resamples images, with the same resamples for every head, so intervals of
    different heads are comparable; the seed makes them reproducible.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    n_heads, n = deltas.shape
    score = deltas.mean(axis=1)
    stderr = deltas.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(n_heads, np.nan)
    if bootstrap > 0 and n > 0:
        rng = np.random.default_rng(seed)
        means = np.empty((bootstrap, n_heads))
        for b in range(bootstrap):
            means[b] = deltas[:, rng.integers(0, n, size=n)].mean(axis=1)
        alpha = (1 - ci_level) / 2
        ci_low, ci_high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    else:
        ci_low = ci_high = np.full(n_heads, np.nan)
    return {"score": score, "stderr": stderr, "ci_low": ci_low, "ci_high": ci_high, "n": np.full(n_heads, n)}


def ranks(score: np.ndarray) -> np.ndarray:
    """1-based ranks, highest score first; ties keep the order given (layer, then head)."""
    order = np.argsort(-np.asarray(score), kind="stable")
    r = np.empty(len(order), dtype=np.int64)
    r[order] = np.arange(1, len(order) + 1)
    return r
