"""Checks on what comes out of a replica's model, before any of it is used."""
from __future__ import annotations

import torch

from ..models import ModelError


class NonFiniteLogits(ModelError):
    """A model returned NaN or infinite class logits: its weights or its code are broken for this input."""


def check_finite(logits: torch.Tensor, model: str) -> torch.Tensor:
    """The logits, or a NonFiniteLogits error naming the model: masks, gains and head scores computed from NaN
    or infinite logits would be meaningless, yet would rank heads without any sign of it."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=-1).sum()) if logits.dim() > 1 else 1
        kind = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
        raise NonFiniteLogits(
            f"{model} returned {kind} class logits for {bad} of {logits.shape[0] if logits.dim() else 1} inputs; "
            "its weights did not load as they should (e.g. buffers left uninitialised by a model's own code) or its "
            "precision overflows: check the model in fp32 (--precision fp32) on one image before scanning")
    return logits
