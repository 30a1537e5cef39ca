"""Jensen-Shannon divergence between categorical distributions (natural log, range [0, ln 2])."""
from __future__ import annotations

import torch

EPS = 1e-12


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim; probabilities are clamped at 1e-12 inside the logs only."""
    return (p * (p.clamp_min(EPS).log() - q.clamp_min(EPS).log())).sum(-1)


def js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS(p, q) = KL(p||m)/2 + KL(q||m)/2 with m = (p+q)/2, over the last dim, in fp32 or wider."""
    if p.dtype not in (torch.float32, torch.float64):
        p = p.float()
    if q.dtype not in (torch.float32, torch.float64):
        q = q.float()
    m = 0.5 * (p + q)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def probs(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """q = softmax(logits / tau), computed in fp32."""
    return torch.softmax(logits.float() / tau, dim=-1)
