"""Fallback adapter for other timm models whose blocks use timm-style attention modules.

It runs the whole model for every ablation (no prefix sharing); heads are found by walking the
modules in registration order, which is the order the model applies them.
"""
from __future__ import annotations

from torch import nn

from .base import HeadAdapter, HeadGates, ModelError


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
