"""Adapter for timm's VisionTransformer family (vit_*, deit_*, *_dinov2 with layer scale and registers)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from .base import HeadAdapter, HeadGates


class TimmViTAdapter(HeadAdapter):
    """embed = patch embedding + prefix tokens + position embedding; readout = final norm + head.

    Blocks run as timm wrote them; the keep-mask acts through the gates on `attn.proj`.
    """

    supports_prefix = True

    def __init__(self, model: VisionTransformer):
        self.model = model
        self.gates = HeadGates([blk.attn for blk in model.blocks])
        self.input_size = tuple(model.patch_embed.img_size)

    @staticmethod
    def accepts(model: torch.nn.Module) -> bool:
        return isinstance(model, VisionTransformer) and all(hasattr(b, "attn") for b in model.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def block(self, layer: int, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        blk = self.model.blocks[layer]
        if keep is None:
            return blk(tokens)
        with self.gates.use({layer: keep}):
            return blk(tokens)

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens))
