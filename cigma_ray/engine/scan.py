"""The head scan of one replica: BIG^(-h) for many (head, image) pairs, fast and exact.

Two tricks (DESIGN section 6): the layers below layer l are the same for every head of layer l,
so their output is computed once and reused; and many (head, image) pairs go through one
batched forward, each with its own keep-mask. The paper-style reference, which re-runs the
whole model with zeroed weights, is `engine.reference.scan_by_weight_zeroing`.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterator, NamedTuple

import torch

from ..method import js, probs
from ..models import HeadAdapter
from .checks import check_finite


class Ablated(NamedTuple):
    """Gains of the ablated model per (head, image): (heads, N) fp32 CPU tensors; fig and swap are None when
    not measured."""

    big: torch.Tensor
    fig: torch.Tensor | None = None
    swap: torch.Tensor | None = None


def pair_chunks(n_heads: int, n_images: int, pairs_per_chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(head positions, image indices) of consecutive chunks of the head-major pair list."""
    total = n_heads * n_images
    for start in range(0, total, pairs_per_chunk):
        flat = torch.arange(start, min(start + pairs_per_chunk, total))
        yield flat // n_images, flat % n_images


@torch.inference_mode()
def scan_heads(
    adapter: HeadAdapter,
    images: torch.Tensor,
    images_no_bg: torch.Tensor,
    heads: list[tuple[int, int]],
    *,
    tau: float = 1.0,
    batch_size: int = 64,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_pairs: Callable[[int], None] | None = None,
    removed: dict[int, torch.Tensor] | None = None,
    images_no_fg: torch.Tensor | None = None,
    model_name: str = "the model",
    images_swap: torch.Tensor | None = None,
) -> Ablated:
    """BIG_i^(-h) = JS(q^(-h)(I_i), q^(-h)(I_i,-bg)) for every head in `heads` and image i, and
    FIG_i^(-h) = JS(q^(-h)(I_i), q^(-h)(I_i,-fg)) too when `images_no_fg` is given (1.5x the forwards),
    and SWAP_i^(-h) = JS(q^(-h)(I_i), q^(-h)(I_i,swap)) when `images_swap` (the background-swapped
    images) is given: one more view per pair.

    Returns Ablated(big=BIG^(-h), fig=FIG^(-h) or None, swap=SWAP^(-h) or None), each (len(heads), N).
    `batch_size` counts images per forward pass (a pair costs one per view); results do not depend
    on it beyond float rounding. `removed` holds per-layer (heads,) keep vectors of heads pruned
    for good (iterative rounds): they stay ablated in every forward, and each scanned head is
    ablated on top of them.
    """
    n = images.shape[0]
    views = [images, images_no_bg] + [v for v in (images_no_fg, images_swap) if v is not None]
    fig_view = 2 if images_no_fg is not None else None
    swap_view = len(views) - 1 if images_swap is not None else None
    pairs_per_chunk = max(1, batch_size // len(views))
    x = torch.cat(views)
    base = {layer: k.to(x.device) for layer, k in (removed or {}).items()}

    def fixed(layer: int, batch: int) -> torch.Tensor | None:
        return base[layer].expand(batch, -1) if layer in base else None

    out = torch.empty(len(heads), n, dtype=torch.float32)
    out_fig = torch.empty(len(heads), n, dtype=torch.float32) if fig_view is not None else None
    out_swap = torch.empty(len(heads), n, dtype=torch.float32) if swap_view is not None else None
    by_layer: dict[int, list[int]] = defaultdict(list)
    for pos, (layer, _) in enumerate(heads):
        by_layer[layer].append(pos)
    last = max(by_layer, default=-1)
    tokens = None
    if adapter.supports_prefix and last >= 0:
        with autocast():
            tokens = batched(adapter.embed, x, batch_size)

    for layer in range(last + 1):
        positions = torch.tensor(by_layer.get(layer, []), dtype=torch.long)
        head_of = torch.tensor([heads[p][1] for p in positions.tolist()], dtype=torch.long)
        for head_pos, img in pair_chunks(len(positions), n, pairs_per_chunk):
            idx = torch.cat([img + v * n for v in range(len(views))]).to(x.device)
            keep = fixed(layer, len(idx))
            keep = torch.ones(len(idx), adapter.heads_per_layer[layer], device=x.device) if keep is None else keep.clone()
            keep[torch.arange(len(idx)), head_of[head_pos].repeat(len(views)).to(x.device)] = 0
            with autocast():
                if tokens is not None:
                    logits = suffix(adapter, layer, tokens[idx], keep, fixed)
                else:
                    masks = {l: fixed(l, len(idx)) for l in base}
                    logits = adapter.logits(x[idx], {**masks, layer: keep})
            q = probs(check_finite(logits.float(), model_name), tau).split(len(img))
            out[positions[head_pos], img] = js(q[0], q[1]).cpu()
            if out_fig is not None:
                out_fig[positions[head_pos], img] = js(q[0], q[fig_view]).cpu()
            if out_swap is not None:
                out_swap[positions[head_pos], img] = js(q[0], q[swap_view]).cpu()
            if on_pairs is not None:
                on_pairs(len(img))
        if tokens is not None and layer < last:
            with autocast():
                tokens = batched(lambda t, layer=layer: adapter.block(layer, t, fixed(layer, len(t))), tokens, batch_size)
    return Ablated(out, out_fig, out_swap)


def suffix(adapter: HeadAdapter, layer: int, tokens: torch.Tensor, keep: torch.Tensor,
           fixed: Callable[[int, int], torch.Tensor | None]) -> torch.Tensor:
    """Logits from the input of block `layer` on: `keep` in that block, the fixed removals in later ones."""
    last = adapter.num_layers - 1
    for current in range(layer, last):
        tokens = adapter.block(current, tokens, keep if current == layer else fixed(current, len(tokens)))
    return adapter.finish(tokens, keep if layer == last else fixed(last, len(tokens)))


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn over x in slices of batch_size along dim 0, concatenated."""
    return torch.cat([fn(x[i: i + batch_size]) for i in range(0, x.shape[0], batch_size)])
