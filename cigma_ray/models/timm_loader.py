"""The `timm:NAME` family: timm models, their checkpoints, and the adapter each one gets."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

import torch

from .base import ModelError, ModelSpec
from .registry import LoadedModel, register, register_check


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


def bad_kwarg(arch: str, kwargs: dict) -> str | None:
    """What is wrong with a --model-kwargs value, by the model class's own signature: a value of another type
    than the argument takes (None when nothing is, or the class cannot be told). Names the class does not take
    are left to timm.create_model, whose builder takes some itself (pretrained_cfg_overlay, features_only, ...)."""
    import inspect

    import timm

    if not kwargs:
        return None
    try:
        with torch.device("meta"):  # the class only: no weights, no memory
            cls = type(timm.create_model(arch, pretrained=False))
        params = inspect.signature(cls.__init__).parameters
    except Exception:  # noqa: BLE001 - a model that cannot be built on "meta": let create_model say
        return None
    for key, value in kwargs.items():
        if key not in params:
            continue
        p = params[key]
        want = type_name(p.annotation, p.default)
        if want and not fits(value, p.annotation, p.default):
            default = "" if p.default is inspect.Parameter.empty else f" (default {p.default!r})"
            return (f"--model-kwargs {key}={value}: {cls.__name__}'s {key} takes {want}{default}, "
                    f"not the {type(value).__name__} {value!r}")
    return None


def fits(value, annotation, default) -> bool:
    """Whether a value fits a parameter's annotation (or, without one, its default's type); unknown forms fit."""
    import inspect
    import typing

    if annotation is inspect.Parameter.empty:
        annotation = type(default) if default not in (None, inspect.Parameter.empty) else None
    if annotation is None or annotation is typing.Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(fits(value, a, inspect.Parameter.empty) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # a class, a callable, a string annotation: not checked here


def type_name(annotation, default) -> str | None:
    """An annotation in words ("int", "int or tuple", "one of 'token', 'avg'"); None when it says nothing."""
    import inspect
    import typing

    if annotation is inspect.Parameter.empty:
        return type(default).__name__ if default not in (None, inspect.Parameter.empty) else None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        names = [type_name(a, inspect.Parameter.empty) for a in args if a is not type(None)]
        return " or ".join(n for n in names if n) or None
    if origin in (tuple, list):
        return "a tuple"
    return getattr(annotation, "__name__", None)


def state_dict_mismatch(model: torch.nn.Module, state_dict: dict) -> str | None:
    """Why a checkpoint does not load strictly into `model`, in one sentence: the first missing and unexpected
    keys, the first shape that differs, and the architecture the checkpoint looks like; None when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [(k, tuple(state_dict[k].shape), tuple(own[k].shape)) for k in own if k in state_dict
              and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's weights are missing from it (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its weights are not in the model (first: {unexpected[0]})")
    if shapes:
        k, theirs, ours = shapes[0]
        parts.append(f"{len(shapes)} shapes differ (first: {k}, {list(theirs)} in the checkpoint, {list(ours)} in the "
                     "model)")
    looks, hint = describe_checkpoint(state_dict, model)
    return (f"{'; '.join(parts)}. The checkpoint looks like {looks}"
            + (f"; build the model that way: {hint}" if hint else
               "; build the model the way it was trained (--model, --num-classes, --img-size, --model-kwargs)"))


def describe_checkpoint(state_dict: dict, model: torch.nn.Module | None = None) -> tuple[str, str]:
    """(what a state dict's keys and shapes say it is, the options that would build a timm model like it: only
    those that differ from `model`, "" when unknown)."""
    import re

    keys = list(state_dict)
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    proj = state_dict.get("patch_embed.proj.weight")
    if not blocks or proj is None or proj.dim() != 4:
        stems = sorted({k.split(".")[0] for k in keys})
        kind = ("a ResNet-style CNN" if {"conv1", "layer1"} <= set(stems) else
                "a CLIP or Hugging Face model (load it with --model hf:DIR)"
                if {"visual", "vision_model"} & set(stems) else
                "a wrapped state dict (its keys share a prefix: strip it)" if len(stems) == 1 else
                "no timm VisionTransformer")
        return f"{kind} (top-level names: {', '.join(stems[:8])}{', ...' if len(stems) > 8 else ''})", ""
    width, patch = int(proj.shape[0]), tuple(int(s) for s in proj.shape[2:])
    prefix = int("cls_token" in state_dict) + int("dist_token" in state_dict)
    regs = int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0
    pos = state_dict.get("pos_embed")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    head = state_dict.get("head.weight")
    facts = {"depth": len(blocks), "embed_dim": width, "patch_size": patch[0] if patch[0] == patch[1] else patch}
    if fc1 is not None:
        facts["mlp_ratio"] = float(fc1.shape[0]) / width
    img_size = None
    if pos is not None and pos.dim() == 3:  # patches, with or without the class token's position
        for grid in (int(pos.shape[1]) - prefix, int(pos.shape[1])):
            side = int(round(max(grid, 0) ** 0.5))
            if grid > 0 and side * side == grid:
                img_size = side * patch[0]
                break
    words = (f"a ViT with {len(blocks)} blocks of width {width}, patch {patch[0]}x{patch[1]}"
             + (f", {int(pos.shape[1])} position embeddings ({img_size} px)" if pos is not None and img_size else "")
             + (", a class token" if "cls_token" in state_dict else ", no class token")
             + (f", {regs} register tokens" if regs else "")
             + (f", {int(head.shape[0])} classes" if head is not None and head.dim() == 2 else ""))
    if model is None:
        return words, ""
    current = {"depth": len(getattr(model, "blocks", [])), "embed_dim": getattr(model, "embed_dim", None),
               "patch_size": getattr(getattr(model, "patch_embed", None), "patch_size", (None,))[0],
               "mlp_ratio": (model.blocks[0].mlp.fc1.out_features / model.embed_dim
                             if getattr(model, "blocks", None) and hasattr(model.blocks[0], "mlp") else None)}
    hint = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items() if current.get(k) != v]
    options = []
    if hint:
        options.append("--model-kwargs " + " ".join(hint))
    own_size = getattr(getattr(model, "patch_embed", None), "img_size", (None,))[0]
    if img_size and img_size != own_size:
        options.append(f"--img-size {img_size}")
    if head is not None and head.dim() == 2 and int(head.shape[0]) != getattr(model, "num_classes", None):
        options.append(f"--num-classes {int(head.shape[0])}")
    return words, " ".join(options)


@register_check("timm")
def check_timm(spec: ModelSpec) -> None:
    """A timm architecture timm knows, and --model-kwargs/--img-size it takes (the class built on "meta")."""
    import timm

    if not timm.is_model(spec.arch):
        close = timm.list_models(f"*{spec.arch.split('_')[0]}*")[:8]
        raise ModelError(f"--model {spec.name!r}: timm has no model {spec.arch!r}"
                         + (f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"))
    kwargs = {**spec.model_kwargs, **({"img_size": spec.img_size} if spec.img_size is not None else {})}
    bad = bad_kwarg(spec.arch, kwargs)  # a value of the wrong type fails deep inside timm: name it instead
    if bad:
        raise ModelError(f"{bad} (for {spec.name})")


@register("timm")
def load_timm(spec: ModelSpec, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    import timm
    from timm.data import create_transform, resolve_data_config

    from .timm_generic import TimmGenericAdapter
    from .timm_vit import TimmViTAdapter

    check_timm(spec)
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
    except Exception as e:  # noqa: BLE001 - download failures and bad arguments come in many types
        if pretrained and not isinstance(e, (TypeError, ValueError)):
            raise ModelError(f"could not get pretrained weights for {spec.name} ({type(e).__name__}: {e}); "
                             "pass --checkpoint FILE with local weights, or --random-weights to scan a random model") from None
        raise ModelError(f"timm.create_model({spec.arch!r}, ...) failed with --model-kwargs/--img-size "
                         f"{', '.join(f'{k}={v!r}' for k, v in spec.model_kwargs.items()) or '(none)'}"
                         f"{f', img_size={spec.img_size}' if spec.img_size else ''}: {type(e).__name__}: {e}") from None
    if state_dict is not None:
        mismatch = state_dict_mismatch(model, state_dict)
        if mismatch:
            raise ModelError(f"--checkpoint {spec.checkpoint} does not fit {spec.name}: {mismatch}")
        model.load_state_dict(state_dict, strict=True)

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
