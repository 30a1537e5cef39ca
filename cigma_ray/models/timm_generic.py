"""Fallback adapter for other timm models whose blocks use timm-style attention modules.

It runs the whole model for every ablation (no prefix sharing); heads are found by walking the
modules in registration order, which is the order the model applies them.
"""
from __future__ import annotations

from torch import nn

from .attention import find_attentions
from .base import HeadAdapter, HeadGates, ModelError


class TimmGenericAdapter(HeadAdapter):
    supports_prefix = False

    def __init__(self, model: nn.Module, input_size: tuple[int, int]):
        attentions = find_attentions(model)
        if not attentions:
            raise ModelError(f"{type(model).__name__} has no timm attention modules (with .num_heads and .proj); "
                             "cigma-ray can only scan models built from attention heads")
        self.model = model
        self.gates = HeadGates(attentions)
        self.input_size = input_size
