"""Gradient pre-screen: a first-order estimate of every head's CIGMA terms from one forward and one
backward per view and image (attribution patching).

Give every head h an output gate g_h, the keep-mask value its output is multiplied by just before
the attention's output projection (`models.base.HeadGates`): g_h = 1 is the intact model, g_h = 0
the head ablated. For one image, BIG_i(g) = JS(q_g(I_i), q_g(I_i,-bg)) with both distributions from
the gated model, so

    BIG_i - BIG_i^(-h) = BIG_i(1) - BIG_i(1 - e_h) ~ dBIG_i / dg_h at g = 1,

the first-order Taylor step from g_h = 1 to 0 (exact for a function linear in g_h; a screen, not a
measurement). One backward of sum_i BIG_i through per-image gates (a (B, heads) gate tensor per
layer, shared by an image's views) gives the derivative for every head and image at once; FIG
takes a second backward through the same forward. It works for any adapter whose forward goes
through its gates (timm, Hugging Face CLIP and vision-language models), whole-model forwards only.
The scan's decision stays the exact, bounded one (`method.adaptive`); the screen only orders work.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from ..method import counterfactuals, js
from ..models import HeadAdapter


class Screened(NamedTuple):
    """Per (head, image), (H, N) fp32 CPU tensors in adapter.heads order: dBIG_i/dg_h, dFIG_i/dg_h
    (None unless asked), and the intact BIG_i, FIG_i (N,) of the same forward."""

    grad_big: torch.Tensor
    grad_fig: torch.Tensor | None
    big: torch.Tensor
    fig: torch.Tensor | None


def _probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(logits / tau) in fp32, or fp64 for fp64 logits (the finite-difference tests)."""
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / tau, dim=-1)


def gate_gradients(
    adapter: HeadAdapter,
    images: torch.Tensor,
    images_no_bg: torch.Tensor,
    images_no_fg: torch.Tensor | None = None,
    *,
    tau: float = 1.0,
    batch_size: int = 32,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    removed: dict[int, torch.Tensor] | None = None,
    at: dict[int, torch.Tensor] | None = None,
) -> Screened:
    """dBIG_i/dg_h (and dFIG_i/dg_h with `images_no_fg`) for every head h and image i.

    `batch_size` counts images per forward (each image goes through 2 or 3 views together).
    `removed`: per-layer (heads,) keep vectors of heads pruned for good (iterative rounds), held at 0.
    `at`: per-layer (heads,) gate values to take the derivative at instead of 1 (tests).
    """
    n = images.shape[0]
    views = [images, images_no_bg] + ([] if images_no_fg is None else [images_no_fg])
    per_layer = adapter.heads_per_layer
    device = images.device
    grad_big = torch.empty(sum(per_layer), n, dtype=torch.float32)
    grad_fig = torch.empty(sum(per_layer), n, dtype=torch.float32) if images_no_fg is not None else None
    big, fig = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    gate_dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        b = sl.stop - sl.start
        gates = []
        for layer, heads in enumerate(per_layer):
            value = torch.ones(heads, dtype=gate_dtype) if at is None or layer not in at else at[layer].to(gate_dtype)
            gates.append(value.to(device).expand(b, heads).clone().requires_grad_(True))
        keep = {}
        for layer, g in enumerate(gates):
            k = g if removed is None or layer not in removed else g * removed[layer].to(device, gate_dtype)
            keep[layer] = k.repeat(len(views), 1)  # one gate per image, shared by its views
        x = torch.cat([v[sl] for v in views])
        with torch.enable_grad(), autocast():
            q = _probs(adapter.logits(x, keep), tau).split(b)
            b_i = js(q[0], q[1])
            f_i = js(q[0], q[2]) if images_no_fg is not None else None
            d_big = torch.autograd.grad(b_i.sum(), gates, retain_graph=f_i is not None, allow_unused=True)
            d_fig = torch.autograd.grad(f_i.sum(), gates, allow_unused=True) if f_i is not None else None
        grad_big[:, sl] = _stack(d_big, gates)
        if grad_fig is not None:
            grad_fig[:, sl] = _stack(d_fig, gates)
        big[sl] = b_i.detach().float().cpu()
        if f_i is not None:
            fig[sl] = f_i.detach().float().cpu()
    return Screened(grad_big, grad_fig, big, fig if images_no_fg is not None else None)


def _stack(grads, gates) -> torch.Tensor:
    """(B, heads) per layer -> (H, B) in adapter.heads order; a head nothing depends on has 0."""
    return torch.cat([(torch.zeros_like(g) if d is None else d).detach().float().cpu().t()
                      for d, g in zip(grads, gates)])


def screen_images(adapter: HeadAdapter, images: torch.Tensor, fg: torch.Tensor, *, tau: float = 1.0,
                  measure_fig: bool = True, batch_size: int = 32,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  removed: dict[int, torch.Tensor] | None = None) -> Screened:
    """The screen of a batch of D's images with their foreground cells S (N, s, s): builds the
    counterfactuals as the scan does (`method.counterfactuals`) and calls `gate_gradients`."""
    no_bg, no_fg = counterfactuals(images, fg)
    return gate_gradients(adapter, images, no_bg, no_fg if measure_fig else None, tau=tau, batch_size=batch_size,
                          autocast=autocast, removed=removed)
