"""The `hf:PATH` family: Hugging Face `transformers` models, found by the architecture in config.json.

PATH is a directory written by `save_pretrained` (weights, config.json, and the processor or
tokenizer files), or an object-storage URL (s3://, gs://, ... through fsspec) of such a
directory, copied once to a local cache. Which adapter a model gets is decided by
`config.model_type` (ADAPTERS): CLIP in clip.py, the vision-language models in vlm.py (which
says how to add another), InternVL2/2.5 as published (`internvl_chat`) in internvl_chat.py.
"""
from __future__ import annotations

import hashlib
import os

import torch

from ..base import ModelError, ModelSpec
from ..registry import LoadedModel, register
from .clip import load_clip
from .common import check_spec, local_path, model_type, options, weights_fingerprint
from .internvl_chat import load_internvl_chat
from .vlm import ARCHITECTURES, load_vlm

ADAPTERS = {"clip": load_clip, **{name: load_vlm for name in ARCHITECTURES}, "internvl_chat": load_internvl_chat}


def check_model_type(kind: str, name: str) -> None:
    """An adapter exists for config.json's model_type (checked before any weights are copied)."""
    if kind not in ADAPTERS:
        raise ModelError(f"--model {name}: config.json has model_type {kind!r}, which cigma-ray has no adapter "
                         f"for; supported: {', '.join(sorted(ADAPTERS))} (models/hf/vlm.py says how to add one)")


@register("hf")
def load_hf(spec: ModelSpec, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """Find the directory, pick the adapter by config.json's model_type, and fingerprint the result."""
    check_spec(spec)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelError(f"--model {spec.name}: needs the `hf` extra: pip install 'cigma-ray[hf]'") from None
    path = local_path(spec.arch, lambda config: check_model_type(config.get("model_type", ""), spec.name))
    kind = model_type(path)
    check_model_type(kind, spec.name)
    adapter, transform = ADAPTERS[kind](spec, path, device, precision)
    with open(os.path.join(path, "config.json")) as f:
        config_hash = hashlib.sha256(f.read().encode()).hexdigest()[:16]
    fingerprint = {"name": spec.name, "checkpoint": None, "model_kwargs": {}, "img_size": None, "options": options(spec),
                   "weights": weights_fingerprint(path), "config": config_hash, "architecture": kind,
                   "num_classes": len(spec.classes), "input_size": list(adapter.input_size),
                   "layer_labels": adapter.layer_labels}
    return LoadedModel(adapter=adapter, transform=transform, num_classes=len(spec.classes), fingerprint=fingerprint)


load_hf.describes = True  # device "meta": a vision-language model's structure without its weights


