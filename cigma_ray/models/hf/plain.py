"""A scanned Hugging Face classifier's plain `transformers` model, for export: the model class a user loads
(CLIPModel, LlavaForConditionalGeneration, ...) read again from the model's directory, and the output
projections inside it that the adapter's head layers address, in layer order."""
from __future__ import annotations

import torch
from torch import nn

from ..base import ModelError, ModelSpec
from ..registry import LoadedModel
from .clip import CLIPZeroShot
from .common import local_path
from .vlm import VLMClassifier


def plain_model(loaded: LoadedModel, spec: ModelSpec) -> tuple[nn.Module, list[tuple[nn.Linear, int]], str, str]:
    """(the plain transformers model in fp32 on the CPU, its (output projection, heads) per scanned layer, its
    class name, the prefix of the classifier's part inside it: 'vision_model.' for CLIP, '' for a VLM)."""
    import transformers

    path = local_path(spec.arch)
    adapter, model = loaded.adapter, loaded.adapter.model
    if isinstance(model, CLIPZeroShot):
        cls, root, prefix = "CLIPModel", model.vision, "vision_model."
    elif isinstance(model, VLMClassifier):
        cls, root, prefix = model.arch.model_class, model.vlm, ""
    else:
        raise ModelError(f"{type(model).__name__}: no plain transformers model to export it as")
    plain = getattr(transformers, cls).from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    part = plain.get_submodule(prefix[:-1]) if prefix else plain
    names = {id(m): n for n, m in root.named_modules()}
    pairs = [(part.get_submodule(names[id(proj)]), heads)
             for proj, heads in zip(adapter.gates.projections, adapter.heads_per_layer)]
    return plain, pairs, cls, prefix


def load_into(loaded: LoadedModel, state: dict, prefix: str) -> None:
    """Put an exported state dict of the plain model into a loaded classifier (to check it gives the ablation)."""
    model = loaded.adapter.model
    root = model.vision if isinstance(model, CLIPZeroShot) else model.vlm
    root.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
