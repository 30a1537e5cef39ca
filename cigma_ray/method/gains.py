"""Foreground and background information gains (FIG, BIG) and the background influence ratio."""
from __future__ import annotations

import numpy as np
import torch

from .divergence import js


def gains(q: torch.Tensor, q_no_fg: torch.Tensor, q_no_bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FIG, BIG, BIR) per image; BIR is NaN where FIG + BIG is 0 (the image depends on neither)."""
    fig = js(q, q_no_fg)
    big = js(q, q_no_bg)
    total = fig + big
    bir = torch.where(total > 0, big / total.clamp_min(torch.finfo(total.dtype).tiny), torch.full_like(total, float("nan")))
    return fig, big, bir


def bir_summary(fig, big) -> dict[str, float]:
    """Mean of per-image BIR and ratio of means, over images with FIG + BIG > 0 (numpy arrays)."""
    fig, big = np.asarray(fig, dtype=np.float64), np.asarray(big, dtype=np.float64)
    ok = (fig + big) > 0
    if not ok.any():
        return {"bir_mean": float("nan"), "bir_ratio": float("nan"), "n": 0}
    return {"bir_mean": float(np.mean(big[ok] / (fig[ok] + big[ok]))),
            "bir_ratio": float(big[ok].mean() / (fig[ok].mean() + big[ok].mean())),
            "n": int(ok.sum())}
