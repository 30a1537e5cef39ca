"""Per-head scores (the paper's mean drop in BIG and two variants), standard errors, seeded bootstrap intervals, ranks."""
from __future__ import annotations

import numpy as np

from .bootstrap import resampled_means
from .gains import bir

# What each score is the mean over images of, for (head h, image i). A head that every prediction
# depends on shrinks FIG and BIG together when ablated; big_drop rewards it, the other two do not.
SCORES = {
    "big_drop": "BIG_i - BIG_i^(-h): the drop in background information gain (the paper's CIGMA score)",
    "bir_drop": "BIR_i - BIR_i^(-h): the drop in the background influence ratio BIG / (FIG + BIG)",
    "big_minus_fig": "(BIG_i - BIG_i^(-h)) - (FIG_i - FIG_i^(-h)): the drop in BIG beyond the drop in FIG",
    "swap_drop": "SWAP_i - SWAP_i^(-h): the drop in how far another class's background moves the prediction",
}
FIG_SCORES = ("bir_drop", "big_minus_fig")  # need FIG^(-h) from the scan (config measure_fig)
SWAP_SCORES = ("swap_drop",)  # need SWAP^(-h) from the scan (config measure_swap)


def available_scores(measure_fig: bool, measure_swap: bool = False) -> list[str]:
    """The scores a scan gives: big_drop always, the FIG scores with FIG^(-h), swap_drop with SWAP^(-h)."""
    return [name for name in SCORES if (name not in FIG_SCORES or measure_fig) and (name not in SWAP_SCORES or measure_swap)]


def score_terms(big: np.ndarray, big_ablated: np.ndarray, fig: np.ndarray | None = None,
                fig_ablated: np.ndarray | None = None, swap: np.ndarray | None = None,
                swap_ablated: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each score's per-(head, image) term, whose mean over images is the score; broadcasting
    shapes, e.g. big (N,) against big_ablated (H, N). Without FIG^(-h), no bir_drop nor big_minus_fig;
    without SWAP^(-h), no swap_drop.

    bir_drop's term is 0 where the intact or the ablated BIR is undefined (FIG + BIG = 0: the
    prediction depends on neither region), so such a pair counts as no change.
    """
    big, big_ablated = np.asarray(big, np.float64), np.asarray(big_ablated, np.float64)
    terms = {"big_drop": big - big_ablated}
    if fig is not None and fig_ablated is not None:
        fig, fig_ablated = np.asarray(fig, np.float64), np.asarray(fig_ablated, np.float64)
        drop = bir(fig, big) - bir(fig_ablated, big_ablated)
        terms["bir_drop"] = np.where(np.isnan(drop), 0.0, drop)
        terms["big_minus_fig"] = (big - big_ablated) - (fig - fig_ablated)
    if swap is not None and swap_ablated is not None:
        terms["swap_drop"] = np.asarray(swap, np.float64) - np.asarray(swap_ablated, np.float64)
    return terms


def head_scores(deltas: np.ndarray, *, bootstrap: int = 1000, ci_level: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
    """Summaries of a (heads, images) matrix of per-image score terms: mean, standard error, and a
    bootstrap interval from `resampled_means` (reproducible by its seed, comparable across heads)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    n_heads, n = deltas.shape
    score = deltas.mean(axis=1)
    stderr = deltas.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(n_heads, np.nan)
    if bootstrap > 0 and n > 0:
        means = np.concatenate(list(resampled_means(deltas, bootstrap, seed)))
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
