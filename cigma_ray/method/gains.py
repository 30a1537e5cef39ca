"""Foreground and background information gains (FIG, BIG) and the background influence ratio (BIR)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .divergence import js


def gains(q: torch.Tensor, q_no_fg: torch.Tensor, q_no_bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FIG, BIG) per image: JS to the prediction without the foreground, and without the background."""
    return js(q, q_no_fg), js(q, q_no_bg)


def bir(fig, big) -> np.ndarray:
    """BIR = BIG / (FIG + BIG) per image (any broadcasting shapes, in their dtype), NaN where FIG + BIG
    is 0: the prediction depends on neither region. The one place BIR is computed."""
    fig, big = np.asarray(fig), np.asarray(big)
    total = fig + big
    out = np.full(np.broadcast(fig, big).shape, np.nan, dtype=np.result_type(fig, big))
    return np.divide(big, total, out=out, where=total > 0)


def bir_summary(fig, big) -> dict[str, float]:
    """Mean of per-image BIR and ratio of means, over images with FIG + BIG > 0."""
    stats = bir_statistics(fig, big)
    ok = (np.asarray(fig, np.float64) + np.asarray(big, np.float64)) > 0
    if not ok.any():
        return {"bir_mean": float("nan"), "bir_ratio": float("nan"), "n": 0}
    one = np.ones((1, len(ok)))
    return {"bir_mean": float(stats["bir_mean"](one)[0]), "bir_ratio": float(stats["bir_ratio"](one)[0]),
            "n": int(ok.sum())}


def bir_statistics(fig, big) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Mean BIR and ratio-of-means BIR over images with FIG + BIG > 0, as functions of per-image weights
    (m, n) -> (m,), for `bootstrap.bootstrap`."""
    fig, big = np.asarray(fig, dtype=np.float64), np.asarray(big, dtype=np.float64)
    ok = ((fig + big) > 0).astype(np.float64)
    per_image = np.nan_to_num(bir(fig, big), nan=0.0)

    def ratio(w, num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ num) / (w @ den)

    return {"bir_mean": lambda w: ratio(w, per_image, ok), "bir_ratio": lambda w: ratio(w, big * ok, (fig + big) * ok)}
