"""Adapter for timm's VisionTransformer family (vit_*, deit_*, *_dinov2 with layer scale and registers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

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
        self.readout_rows = readout_rows(model)

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

    def finish(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The last block for the read-out's rows only: their queries, attention, projection and MLP
        (keys and values still come from every token). On ViT-B/16 that skips 196 of 197 rows."""
        rows = self.readout_rows
        if rows is None:
            return super().finish(tokens, keep)
        layer = self.num_layers - 1
        blk = self.model.blocks[layer]
        with self.gates.use({layer: keep} if keep is not None else {}):
            out = tokens[:, :rows] + blk.drop_path1(blk.ls1(leading_rows_attention(blk.attn, blk.norm1(tokens), rows)))
        out = out + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(out))))
        return self.readout(out)


def readout_rows(model: VisionTransformer) -> int | None:
    """How many leading tokens the read-out uses (class token; DeiT's class and distillation tokens),
    or None where it uses them all (average pooling, attention pooling, other block types)."""
    rows = {VisionTransformer: 1, VisionTransformerDistilled: 2}.get(type(model))
    last = model.blocks[-1]
    if (rows is None or model.global_pool != "token" or getattr(model, "attn_pool", None) is not None
            or type(last) is not Block or type(last.attn) is not Attention):
        return None
    return rows


def leading_rows_attention(attn: Attention, x: torch.Tensor, rows: int) -> torch.Tensor:
    """timm's Attention.forward for the first `rows` tokens' outputs only: (B, N, C) -> (B, rows, C).

    The same operations in the same order (projections, q/k norms, scaled dot-product
    attention, output norm, gate, projection), so hooks on `attn.proj` act as in the full block.
    """
    B, N, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    width = h * d
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :rows], weight[:width], None if bias is None else bias[:width])
    kv = F.linear(x, weight[width:], None if bias is None else bias[width:])
    q = attn.q_norm(q.reshape(B, rows, h, d).transpose(1, 2))
    k, v = kv.reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, attn.k_norm(k), v)
    out = out.transpose(1, 2).reshape(B, rows, width)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    gate = getattr(attn, "gate", None)  # attributes of newer timm releases
    if gate is not None:
        out = out * gate(x[:, :rows]).sigmoid()
    return attn.proj_drop(attn.proj(out))
