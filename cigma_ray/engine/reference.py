"""The plain definitions of head ablation, kept as the yardsticks for every fast path.

- Zero ablation (`scan_by_weight_zeroing`): zero the head's rows of W_Q, W_K, W_V (and their
  biases) and its columns of W_O, run the whole model once per head, restore the weights.
- Mean ablation (`scan_by_mean_substitution`): a forward hook on the attention's output projection
  replaces the head's slice of its input (the head's output) with the head's mean, whole model, once
  per head.

Slow by design; tests and benchmarks compare to them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..method import js, probs
from ..models.surgery import zeroed_head
from .scan import Ablated


@contextlib.contextmanager
def substituted_head(proj: nn.Linear, head: int, heads: int, mean: torch.Tensor) -> Iterator[None]:
    """The definition of mean ablation: within the block, head `head` of the projection's input (its
    `heads` heads side by side) is replaced by that head's slice of `mean` at every row (image and token)."""
    dim = proj.in_features // heads
    cols = slice(head * dim, (head + 1) * dim)
    value = torch.as_tensor(mean).reshape(-1)[cols]

    def substitute(module: nn.Linear, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., cols] = value.to(device=x.device, dtype=x.dtype)
        return (x,) + args[1:]

    handle = proj.register_forward_pre_hook(substitute)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def scan_by_definition(model: nn.Module, ablate: Callable[[int, int], contextlib.AbstractContextManager],
                       images: torch.Tensor, images_no_bg: torch.Tensor, heads: list[tuple[int, int]],
                       tau: float = 1.0, batch_size: int = 64, removed: list[tuple[int, int]] = (),
                       images_no_fg: torch.Tensor | None = None, images_swap: torch.Tensor | None = None) -> Ablated:
    """BIG^(-h) (and FIG^(-h), SWAP^(-h) when their views are given) per head and image, one head at a time,
    whole model, with `ablate(layer, head)` removing a head (on top of the `removed` heads, ablated throughout)."""
    views = {"fig": images_no_fg, "swap": images_swap}
    out = {"big": torch.empty(len(heads), images.shape[0])}
    out.update({name: torch.empty(len(heads), images.shape[0]) for name, v in views.items() if v is not None})
    for pos, (layer, head) in enumerate(heads):
        with contextlib.ExitStack() as stack:
            for l, h in [*removed, (layer, head)]:
                stack.enter_context(ablate(l, h))
            for i in range(0, images.shape[0], batch_size):
                part = slice(i, i + batch_size)
                q = probs(model(images[part]), tau)
                out["big"][pos, part] = js(q, probs(model(images_no_bg[part]), tau)).cpu()
                for name, v in views.items():
                    if v is not None:
                        out[name][pos, part] = js(q, probs(model(v[part]), tau)).cpu()
    return Ablated(out["big"], out.get("fig"), out.get("swap"))


def scan_by_weight_zeroing(model: nn.Module, attentions: list[nn.Module], images: torch.Tensor,
                           images_no_bg: torch.Tensor, heads: list[tuple[int, int]], tau: float = 1.0,
                           batch_size: int = 64, removed: list[tuple[int, int]] = (),
                           images_no_fg: torch.Tensor | None = None,
                           images_swap: torch.Tensor | None = None) -> Ablated:
    """(BIG^(-h), FIG^(-h) when `images_no_fg` is given, SWAP^(-h) when `images_swap` is) per head and image,
    one head at a time, whole model, on zeroed weights (on top of the `removed` heads, zeroed throughout)."""
    return scan_by_definition(model, lambda layer, head: zeroed_head(attentions[layer], head), images, images_no_bg,
                              heads, tau, batch_size, removed, images_no_fg, images_swap)


def scan_by_mean_substitution(model: nn.Module, projections: list[tuple[nn.Linear, int]],
                              means: list[torch.Tensor], images: torch.Tensor, images_no_bg: torch.Tensor,
                              heads: list[tuple[int, int]], tau: float = 1.0, batch_size: int = 64,
                              removed: list[tuple[int, int]] = (), images_no_fg: torch.Tensor | None = None,
                              images_swap: torch.Tensor | None = None) -> Ablated:
    """The same gains with each head (and the `removed` ones) mean-ablated by `substituted_head`: per layer,
    `projections` holds (output projection, number of heads) and `means` the (heads x head_dim,) substitutes."""
    def ablate(layer: int, head: int):
        proj, count = projections[layer]
        return substituted_head(proj, head, count, means[layer])

    return scan_by_definition(model, ablate, images, images_no_bg, heads, tau, batch_size, removed, images_no_fg,
                              images_swap)
