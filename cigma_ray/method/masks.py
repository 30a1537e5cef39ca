"""Foreground masks: the learned soft mask, its binarisation and the counterfactual images."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .divergence import js, probs


def baseline(images: torch.Tensor) -> torch.Tensor:
    """B: the per-image, per-channel mean of the preprocessed image, shape (N, C, 1, 1)."""
    return images.mean(dim=(2, 3), keepdim=True)


def upsample_soft(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """U(M): bilinear upsampling of (N, h, w) masks to (N, 1, H, W)."""
    return F.interpolate(mask.unsqueeze(1), size=size, mode="bilinear", align_corners=False)


def upsample_hard(fg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of (N, h, w) boolean cells to (N, 1, H, W) floats."""
    return F.interpolate(fg.unsqueeze(1).float(), size=size, mode="nearest")


def blend(images: torch.Tensor, keep: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """keep * I + (1 - keep) * B."""
    return keep * images + (1 - keep) * base


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """TV(M) = mean |dx M| + mean |dy M| per mask of shape (N, h, w)."""
    dx = (mask[:, :, 1:] - mask[:, :, :-1]).abs().mean(dim=(1, 2))
    dy = (mask[:, 1:, :] - mask[:, :-1, :]).abs().mean(dim=(1, 2))
    return dx + dy


def mask_loss(q: torch.Tensor, q_keep: torch.Tensor, mask: torch.Tensor,
              l_js: float, l_1: float, l_tv: float) -> torch.Tensor:
    """Per-image objective l_js * JS(q, q(I_keep)) + l_1 * mean(M) + l_tv * TV(M), shape (N,)."""
    return l_js * js(q, q_keep) + l_1 * mask.mean(dim=(1, 2)) + l_tv * total_variation(mask)


def optimise_masks(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    q: torch.Tensor,
    *,
    mask_size: int = 32,
    mask_lr: float = 0.05,
    mask_steps: int = 250,
    l_js: float = 1.0,
    l_1: float = 0.01,
    l_tv: float = 0.1,
    tau: float = 1.0,
    micro_batch: int = 0,
    on_step: Callable[[], None] | None = None,
    mask_tol: float = 0.0,
    mask_window: int = 10,
    return_steps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Learn M = sigmoid(theta) for every image of a batch together; returns (N, s, s) fp32 masks
    (and, with `return_steps`, the (N,) Adam steps each mask took).

    The per-image losses are summed, and Adam is elementwise, so each mask follows exactly the
    trajectory it would follow alone. `micro_batch` > 0 runs each step's forward and backward
    over slices of that many images (less memory) and takes one Adam step after them: the sum's
    gradient for an image is its own loss's gradient either way, so the masks are those of the
    whole batch wherever the model's forward gives an image the same result in a smaller batch.
    `on_step` is called after each optimisation step (progress).

    Early stopping (opt-in, `mask_tol` > 0): an image stops at the first step s >= mask_window at
    which its own loss differs from its loss mask_window steps earlier by less than mask_tol; its
    mask is then the one the loss was measured at (s Adam steps). A stopped image stays in the
    batch's forwards (the batch's composition, and so its float rounding, never changes) and its
    logits are put back after every Adam step (Adam's moments for it run on, unused), so every
    image's mask is its full-length trajectory cut at its own stopping step: bit for bit the mask
    of a run with mask_steps = s, whatever the other images of the batch did. The loop ends when
    every image has stopped. mask_tol = 0 is the method's fixed mask_steps.
    """
    n = images.shape[0]
    size = tuple(images.shape[-2:])
    base = baseline(images)
    theta = torch.zeros(n, mask_size, mask_size, device=images.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=mask_lr)
    chunk = micro_batch if 0 < micro_batch < n else n
    steps = torch.full((n,), mask_steps, dtype=torch.long)
    early = mask_tol > 0
    if early:
        history = torch.empty(mask_window, n, dtype=torch.float32, device=images.device)  # ring of past losses
        stopped = torch.zeros(n, dtype=torch.bool, device=images.device)
        frozen = torch.zeros_like(theta, requires_grad=False)
    for step in range(mask_steps):
        opt.zero_grad(set_to_none=True)
        losses = []
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk)
            mask = torch.sigmoid(theta[rows])
            keep_img = blend(images[rows], upsample_soft(mask, size).to(images.dtype), base[rows])
            per_image = mask_loss(q[rows], probs(logits_fn(keep_img), tau), mask, l_js, l_1, l_tv)
            per_image.sum().backward()
            losses.append(per_image.detach().float())
        if early:
            now = torch.cat(losses)
            if step >= mask_window:
                newly = ~stopped & ((now - history[step % mask_window]).abs() < mask_tol)
                if newly.any():
                    frozen[newly] = theta.detach()[newly]
                    steps[newly.cpu()] = step
                    stopped |= newly
                    if bool(stopped.all()):
                        break
            history[step % mask_window] = now
        opt.step()
        if early and bool(stopped.any()):
            with torch.no_grad():
                theta[stopped] = frozen[stopped]
        if on_step is not None:
            on_step()
    out = torch.sigmoid(theta.detach())
    return (out, steps) if return_steps else out


def foreground_cells(mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """S at cell level: the round(keep_ratio * h * w) largest cells of each (N, h, w) mask.

    Ties go to the lower flat index, so exactly that many cells are kept.
    """
    n, h, w = mask.shape
    k = round(keep_ratio * h * w)
    order = torch.sort(mask.reshape(n, -1), dim=1, descending=True, stable=True).indices
    fg = torch.zeros(n, h * w, dtype=torch.bool, device=mask.device)
    fg.scatter_(1, order[:, :k], True)
    return fg.reshape(n, h, w)


def counterfactuals(images: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I_-bg, I_-fg): background replaced by B, and foreground replaced by B."""
    s = upsample_hard(fg, tuple(images.shape[-2:])).to(images.dtype)
    base = baseline(images)
    return blend(images, s, base), blend(images, 1 - s, base)
