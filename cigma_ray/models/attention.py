"""Finding a model's attention modules, and what its attention looks at (attention rollout)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .registry import LoadedModel


def find_attentions(model: nn.Module) -> list[nn.Module]:
    """Modules with `num_heads` and a `proj` Linear, outermost only, in registration order."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "proj", None), nn.Linear):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def attention_rollout(loaded: LoadedModel, images: torch.Tensor, keep: dict[int, torch.Tensor],
                      removed: list[tuple[int, int]]) -> np.ndarray | None:
    """Attention rollout of a timm ViT (None for other models): the product over layers of
    0.5 * (mean attention of the kept heads) + 0.5 * I, read from the read-out token(s), on the
    patch grid. The attention is recomputed from each block's `attn.qkv`, with `keep` applied."""
    from .timm_vit import TimmViTAdapter

    adapter = loaded.adapter
    model = adapter.model
    if not isinstance(adapter, TimmViTAdapter) or not all(hasattr(b.attn, "qkv") for b in model.blocks):
        return None
    gone = set(removed)
    attentions: list[torch.Tensor | None] = [None] * adapter.num_layers

    def capture(layer: int):
        def hook(attn, args):
            x = args[0]
            b, n, _ = x.shape
            q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(dim=-1)
            kept = [h for h in range(attn.num_heads) if (layer, h) not in gone]
            attentions[layer] = a[:, kept].mean(dim=1) if kept else None
        return hook

    hooks = [blk.attn.register_forward_pre_hook(capture(i)) for i, blk in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            adapter.logits(images, {layer: m.to(images.device).expand(len(images), -1) for layer, m in keep.items()})
    finally:
        for h in hooks:
            h.remove()
    n = next(a.shape[-1] for a in attentions if a is not None)
    rollout = torch.eye(n).expand(len(images), n, n)
    for a in attentions:
        if a is not None:  # a layer with every head removed passes the residual stream through
            rollout = (0.5 * a.float().cpu() + 0.5 * torch.eye(n)) @ rollout
    prefix = model.num_prefix_tokens
    if model.global_pool == "token":  # the class token (and DeiT's distillation token), never registers
        readout = rollout[:, :adapter.readout_rows or 1].mean(dim=1)
    else:  # pooled over the patches
        readout = rollout[:, prefix:].mean(dim=1)
    return readout[:, prefix:].reshape(len(images), *model.patch_embed.grid_size).numpy()
