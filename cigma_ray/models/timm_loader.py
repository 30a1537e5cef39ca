"""The `timm:NAME` family: timm models, their checkpoints, and the adapter each one gets."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

import torch

from .base import ModelError, ModelSpec
from .registry import LoadedModel, register


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_classes(state_dict: dict) -> int | None:
    """The class count a timm classifier checkpoint was trained with (its head's output rows)."""
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in state_dict and state_dict[key].dim() == 2:
            return int(state_dict[key].shape[0])
    return None


@register("timm")
def load_timm(spec: ModelSpec, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    import timm
    from timm.data import create_transform, resolve_data_config

    from .timm_generic import TimmGenericAdapter
    from .timm_vit import TimmViTAdapter

    if not timm.is_model(spec.arch):
        close = timm.list_models(f"*{spec.arch.split('_')[0]}*")[:8]
        raise ModelError(f"--model {spec.name!r}: timm has no model {spec.arch!r}"
                         + (f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"))
    kwargs = dict(spec.model_kwargs)
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    state_dict = None
    num_classes = spec.num_classes
    if spec.checkpoint is not None:
        try:
            state_dict = timm.models.load_state_dict(spec.checkpoint)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ModelError(f"--checkpoint {spec.checkpoint}: cannot be read as a PyTorch or safetensors state dict ({e})") from None
        if num_classes is None:
            num_classes = checkpoint_classes(state_dict)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained = spec.checkpoint is None and not spec.random_weights
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = timm.create_model(spec.arch, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ModelError(f"--model-kwargs/--img-size for {spec.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - download failures come in many types
        if pretrained:
            raise ModelError(f"could not get pretrained weights for {spec.name} ({type(e).__name__}: {e}); "
                             "pass --checkpoint FILE with local weights, or --random-weights to scan a random model") from None
        raise
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ModelError(f"--checkpoint {spec.checkpoint} does not fit {spec.name}: {str(e).splitlines()[0]} "
                             "(build the model the way it was trained: --num-classes, --img-size, --model-kwargs)") from None

    data_cfg = resolve_data_config({}, model=model)
    if TimmViTAdapter.accepts(model):
        adapter = TimmViTAdapter(model)
    else:
        embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        adapter = TimmGenericAdapter(model, tuple(embed_size) if embed_size else tuple(data_cfg["input_size"][-2:]))
    data_cfg["input_size"] = (3, *adapter.input_size)  # the model's own size, not its pretrained config's
    transform = create_transform(**data_cfg, is_training=False)

    if spec.checkpoint is not None:
        weights = f"sha256:{file_sha256(spec.checkpoint)}"
    elif spec.random_weights:
        weights = f"random:seed={spec.seed}"
    else:
        weights = f"pretrained:{model.pretrained_cfg.get('tag') or 'default'}"
    fingerprint = {**asdict(spec), "checkpoint": spec.checkpoint and os.path.abspath(spec.checkpoint),
                   "weights": weights, "num_classes": model.num_classes, "input_size": list(adapter.input_size)}
    return LoadedModel(adapter=adapter, transform=transform, num_classes=model.num_classes, fingerprint=fingerprint)
