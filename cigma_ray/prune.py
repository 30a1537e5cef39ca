"""Ablate a set of heads together and measure what changes: accuracy, BIR, NLL, ECE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .config import Config
from .engine import Replica
from .method import accuracy, bir_summary, ece, nll


@dataclass
class EvalSet:
    """Images with labels, plus a subset with foreground cells (learned on the intact model) for BIR."""

    name: str
    images: torch.Tensor
    labels: np.ndarray
    mask_images: torch.Tensor
    fg: torch.Tensor


def top_heads(rankings: pa.Table, k: int, lowest: bool = False) -> list[tuple[int, int]]:
    """The k best-ranked heads (or the k worst, as a control)."""
    rows = rankings.sort_by([("rank", "descending" if lowest else "ascending")]).slice(0, k).to_pylist()
    return [(r["layer"], r["head"]) for r in rows]


def random_heads(heads: list[tuple[int, int]], k: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [heads[i] for i in sorted(rng.choice(len(heads), size=k, replace=False))]


def check_k(k: int, n_heads: int) -> None:
    from .config import ConfigError

    if not 0 <= k <= n_heads:
        raise ConfigError(f"top_k={k}: the model has {n_heads} heads; choose K between 1 and {n_heads}")


def evaluate(replica: Replica, data: EvalSet, removed: list[tuple[int, int]], cfg: Config) -> dict:
    """Metrics of the model with `removed` heads ablated together (intact when empty)."""
    keep = replica.keep_without(removed)
    p = torch.softmax(replica.logits(data.images, keep) / cfg.tau, dim=1).numpy()
    fig, big, _ = replica.gains(data.mask_images, data.fg, cfg.tau, keep)
    bir = bir_summary(fig.numpy(), big.numpy())
    return {"set": data.name, "k": len(removed), "accuracy": accuracy(p, data.labels), "nll": nll(p, data.labels),
            "ece": ece(p, data.labels), "bir_mean": bir["bir_mean"], "bir_ratio": bir["bir_ratio"],
            "fig": float(fig.mean()), "big": float(big.mean())}
