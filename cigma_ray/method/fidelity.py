"""The gradient pre-screen's estimated score terms, and how faithful a screen is to an exact scan (numpy only)."""
from __future__ import annotations

import numpy as np

from .stability import spearman


def screen_terms(grad_big: np.ndarray, grad_fig: np.ndarray | None = None, big: np.ndarray | None = None,
                 fig: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """First-order estimates of each score's per-(head, image) term from the gate derivatives
    (engine.screen): removing head h moves its gate from 1 to 0, so a drop X_i - X_i^(-h) is about dX_i/dg_h.

    big_drop ~ dBIG/dg; big_minus_fig ~ dBIG/dg - dFIG/dg; bir_drop ~ dBIR/dg =
    (FIG dBIG/dg - BIG dFIG/dg) / (FIG + BIG)^2, 0 where FIG + BIG = 0 (as score_terms counts it).
    Shapes broadcast as in score_terms: (H, N) derivatives against (N,) intact gains.
    """
    grad_big = np.asarray(grad_big, np.float64)
    terms = {"big_drop": grad_big}
    if grad_fig is not None:
        grad_fig = np.asarray(grad_fig, np.float64)
        terms["big_minus_fig"] = grad_big - grad_fig
        if big is not None and fig is not None:
            big, fig = np.asarray(big, np.float64), np.asarray(fig, np.float64)
            total = fig + big
            num = fig * grad_big - big * grad_fig
            den = np.broadcast_to(total ** 2, num.shape)
            terms["bir_drop"] = np.divide(num, den, out=np.zeros(num.shape), where=den > 0)
    return terms


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ties to the lower index (as `scores.ranks` orders heads)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]


def fidelity(estimate: np.ndarray, exact: np.ndarray, k: int) -> dict[str, float]:
    """How well a screen's per-head scores stand in for the exact ones: Spearman's rho, and the share
    of the exact top K found in the screen's top K, 2K and 4K (recall_k, recall_2k, recall_4k)."""
    estimate, exact = np.asarray(estimate, np.float64), np.asarray(exact, np.float64)
    if estimate.shape != exact.shape:
        raise ValueError(f"estimate {estimate.shape} and exact {exact.shape} scores differ in shape")
    k = min(k, len(exact))
    truth = set(top(exact, k).tolist())
    out = {"spearman": spearman(estimate, exact), "k": k}
    for name, m in (("recall_k", k), ("recall_2k", 2 * k), ("recall_4k", 4 * k)):
        out[name] = len(truth & set(top(estimate, m).tolist())) / k if k else float("nan")
    return out
