"""The model registry: families keyed by a spec's prefix ("timm:NAME", "hf:PATH"), and `load`.

A family's loader gets the spec, the device and the run's precision and returns a LoadedModel
(adapter, eval transform, class count, fingerprint). Loaders that place the model themselves (a
model split over several GPUs) set `adapter.placed`; every other model is moved to the device
here. The families register themselves when `cigma_ray.models` is imported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .base import HeadAdapter, ModelError, ModelSpec


@dataclass
class LoadedModel:
    adapter: HeadAdapter
    transform: Callable  # PIL image -> (3, H, W) float tensor
    num_classes: int
    fingerprint: dict


LOADERS: dict[str, Callable[[ModelSpec, str | torch.device], LoadedModel]] = {}


CHECKS: dict[str, Callable[[ModelSpec], None]] = {}  # what a family can check of a spec without weights


def register(family: str):
    def wrap(fn):
        LOADERS[family] = fn
        return fn
    return wrap


def register_check(family: str):
    """A family's check of a spec by its name and options alone (no weights), run by `check_name`."""
    def wrap(fn):
        CHECKS[family] = fn
        return fn
    return wrap


def load(spec: ModelSpec, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """Load, freeze and move the model; raises ModelError with the fix for any bad spec.

    `precision` is the run's: timm weights stay fp32 (bf16 runs under autocast), a large hf model's
    weights load in bf16 for a bf16 run on a GPU. Device "meta" describes the model without its
    weights (heads, classes, fingerprint) where a loader can, so a Ray driver never holds a 26B
    model; loaders that cannot load on the CPU instead.
    """
    if spec.family not in LOADERS:
        raise ModelError(f"--model {spec.name!r}: unknown model family {spec.family!r}; "
                         f"use one of {', '.join(f'{f}:NAME' for f in LOADERS)} (e.g. timm:vit_base_patch16_224)")
    if spec.checkpoint is not None and not os.path.isfile(spec.checkpoint):
        raise ModelError(f"--checkpoint {spec.checkpoint}: file not found")
    fn = LOADERS[spec.family]
    if str(device) == "meta" and not getattr(fn, "describes", False):
        device = "cpu"
    loaded = fn(spec, device, precision)
    model = loaded.adapter.model
    model.eval().requires_grad_(False)
    if not getattr(loaded.adapter, "placed", False):
        model.to(device)
    return loaded


def check_name(spec: ModelSpec) -> None:
    """What can be known of a model from its name and options alone, without weights: the family exists, and
    what the family checks (a timm architecture timm knows, --model-kwargs it takes). Used by `scan` before
    anything loads, `scan --dry-run` and `cluster render`."""
    if spec.family not in LOADERS:
        raise ModelError(f"--model {spec.name!r}: unknown model family {spec.family!r}; "
                         f"use one of {', '.join(f'{f}:NAME' for f in LOADERS)} (e.g. timm:vit_base_patch16_224)")
    if spec.family in CHECKS:
        CHECKS[spec.family](spec)
