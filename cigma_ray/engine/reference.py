"""The plain definition of head ablation, kept as the yardstick for every fast path.

Zero the head's rows of W_Q, W_K, W_V (and their biases) and its columns of W_O, run the whole
model once per head, restore the weights. Slow by design; tests and benchmarks compare to it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..method import js, probs
from ..models.surgery import zeroed_head
from .scan import Ablated


@torch.inference_mode()
def scan_by_weight_zeroing(model: nn.Module, attentions: list[nn.Module], images: torch.Tensor,
                           images_no_bg: torch.Tensor, heads: list[tuple[int, int]], tau: float = 1.0,
                           batch_size: int = 64, removed: list[tuple[int, int]] = (),
                           images_no_fg: torch.Tensor | None = None) -> Ablated:
    """(BIG^(-h), FIG^(-h) when `images_no_fg` is given) per head and image, one head at a time,
    whole model, on zeroed weights (on top of the `removed` heads, zeroed throughout)."""
    out = torch.empty(len(heads), images.shape[0])
    out_fig = None if images_no_fg is None else torch.empty(len(heads), images.shape[0])
    for pos, (layer, head) in enumerate(heads):
        with contextlib.ExitStack() as stack:
            for l, h in [*removed, (layer, head)]:
                stack.enter_context(zeroed_head(attentions[l], h))
            for i in range(0, images.shape[0], batch_size):
                q = probs(model(images[i: i + batch_size]), tau)
                q_no_bg = probs(model(images_no_bg[i: i + batch_size]), tau)
                out[pos, i: i + batch_size] = js(q, q_no_bg).cpu()
                if out_fig is not None:
                    out_fig[pos, i: i + batch_size] = js(q, probs(model(images_no_fg[i: i + batch_size]), tau)).cpu()
    return Ablated(out, out_fig)
