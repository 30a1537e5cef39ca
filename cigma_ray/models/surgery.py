"""Model surgery: a model with heads removed, as weights that plain timm loads.

Two forms of the same pruned model:

- the original architecture with each removed head's W_Q, W_K, W_V rows (and biases) and W_O
  columns zeroed (`zeroed_head`, `zeroed_state_dict`): the plain definition of head ablation,
  and the yardstick of every fast path (`engine.reference`);
- for timm VisionTransformers, a physically smaller model (`smaller_model`): each pruned layer's
  attention rebuilt with only its kept heads (a layer with none left keeps its projection's
  bias, the attention branch's constant value). `save_smaller` / `load_smaller` store it as a
  state dict plus the kept heads per layer, rebuilt from timm alone.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Iterator

import torch
from torch import nn

from .attention import find_attentions
from .base import ModelError, ModelSpec
from .registry import LoadedModel
from .timm_vit import TimmViTAdapter

SMALLER_FORMAT = "cigma-ray/smaller-vit/1"


class RemovedAttention(nn.Module):
    """An attention whose heads were all removed: its output is the projection's bias for any input."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], -1)


@contextlib.contextmanager
def zeroed_head(attn: nn.Module, head: int, mean: torch.Tensor | None = None) -> Iterator[None]:
    """Temporarily zero one head of a timm attention with a fused qkv Linear and a proj Linear; with `mean`
    (the layer's (heads x head_dim,) substitutes, config ablation: mean), also add the head's mean output,
    through W_O, to the projection's bias: the head then always contributes its mean."""
    dim = attn.head_dim if hasattr(attn, "head_dim") else attn.proj.in_features // attn.num_heads
    width = attn.num_heads * dim
    cols = slice(head * dim, (head + 1) * dim)
    saved = [(attn.proj.weight, attn.proj.weight.detach().clone())]
    rows = [slice(part * width + head * dim, part * width + (head + 1) * dim) for part in range(3)]
    saved.append((attn.qkv.weight, attn.qkv.weight.detach().clone()))
    if attn.qkv.bias is not None:
        saved.append((attn.qkv.bias, attn.qkv.bias.detach().clone()))
    if mean is not None:
        saved.append((check_bias(attn.proj, "the attention's proj"), attn.proj.bias.detach().clone()))
    with torch.no_grad():
        if mean is not None:
            attn.proj.bias += folded_mean(attn.proj, cols, mean)
        attn.proj.weight[:, cols] = 0
        for r in rows:
            attn.qkv.weight[r] = 0
            if attn.qkv.bias is not None:
                attn.qkv.bias[r] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


def zeroed_state_dict(attentions: list[nn.Module], model: nn.Module, heads: list[tuple[int, int]],
                      means: list[torch.Tensor | None] | None = None) -> dict:
    """The model's state dict with the heads zeroed as the plain definition does (with `means`, per layer
    substitutes of mean ablation, their means folded into the projections' biases); the model is left intact."""
    with contextlib.ExitStack() as stack:
        for layer, head in heads:
            attn = attentions[layer]
            if not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise ModelError(f"layer {layer}: {type(attn).__name__} has no fused qkv projection, so its heads "
                                 "cannot be exported as zeroed weights")
            stack.enter_context(zeroed_head(attn, head, None if means is None else means[layer]))
        return {name: value.detach().clone() for name, value in model.state_dict().items()}


def check_bias(proj: nn.Linear, what: str) -> nn.Parameter:
    """The projection's bias, which mean ablation folds into; an error that says what to do when there is none."""
    if proj.bias is None:
        raise ModelError(f"{what} has no bias, so a head's mean output cannot be folded into plain weights; "
                         "export this run's heads with ablation: zero (a new scan), or keep the model in cigma-ray")
    return proj.bias


def folded_mean(proj: nn.Linear, cols: slice, mean: torch.Tensor) -> torch.Tensor:
    """W_O[:, cols] @ mean[cols]: what the head adds to the projection's output when it outputs its mean."""
    mean = torch.as_tensor(mean).reshape(-1)[cols]
    return (proj.weight[:, cols].double() @ mean.to(proj.weight.device).double()).to(proj.bias.dtype)


@contextlib.contextmanager
def removed_output_heads(pairs: list[tuple[nn.Linear, int]], heads: list[tuple[int, int]],
                         means: list[torch.Tensor | None] | None = None) -> Iterator[None]:
    """Temporarily remove heads at their output projections only (any attention: timm, Hugging Face): zero
    each head's columns of W_O, and with `means` add W_O[:, head] @ mean to the bias. `pairs` are the
    (output projection, heads) of each layer, as the adapter's gates address them."""
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for layer, head in heads:
                proj, count = pairs[layer]
                dim = proj.in_features // count
                cols = slice(head * dim, (head + 1) * dim)
                params = [proj.weight] + ([check_bias(proj, f"layer {layer}'s output projection")]
                                          if means is not None and means[layer] is not None else [])
                for p in params:
                    saved.setdefault(id(p), (p, p.detach().clone()))
                if len(params) > 1:
                    proj.bias += folded_mean(proj, cols, means[layer])
                proj.weight[:, cols] = 0
        yield
    finally:
        with torch.no_grad():
            for p, value in saved.values():
                p.copy_(value)


def output_heads_state_dict(module: nn.Module, pairs: list[tuple[nn.Linear, int]], heads: list[tuple[int, int]],
                            means: list[torch.Tensor | None] | None = None) -> dict:
    """`module`'s state dict with the heads removed at their output projections (`removed_output_heads`):
    how a Hugging Face model's pruned weights are exported; the module is left intact."""
    with removed_output_heads(pairs, heads, means):
        return {name: value.detach().clone() for name, value in module.state_dict().items()}


def attentions_of(loaded: LoadedModel) -> list[nn.Module]:
    """The attention modules the adapter addresses, in layer order."""
    model = loaded.adapter.model
    return [b.attn for b in model.blocks] if isinstance(loaded.adapter, TimmViTAdapter) else find_attentions(model)


def timm_kwargs(spec: ModelSpec) -> dict:
    """The `timm.create_model` keyword arguments of a spec, as the loader passes them (num_classes aside)."""
    return {**spec.model_kwargs, **({"img_size": spec.img_size} if spec.img_size is not None else {})}


def plain_timm_model(arch: str, num_classes: int, kwargs: dict, state_dict: dict | None = None) -> nn.Module:
    """What a user of timm does: create the architecture without downloads, then load the weights."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_shrinkable(model: nn.Module, heads: list[tuple[int, int]]) -> None:
    """Only timm's plain Attention can be rebuilt with fewer heads and give the same output."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    works = "the zeroed-weights checkpoint (--out without --smaller) works for this model"
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"--smaller: {type(model).__name__} is not a timm VisionTransformer (vit_*, deit_*, *_dinov2); "
                         f"only those can be made physically smaller; {works}")
    if "attn_head_dim" not in inspect.signature(Attention).parameters:
        import timm

        raise ModelError(f"--smaller: timm {timm.__version__}'s Attention cannot be built with fewer heads of the "
                         f"same width (no attn_head_dim); upgrade timm; {works}")
    for layer in sorted({l for l, _ in heads}):
        attn = model.blocks[layer].attn
        if type(attn) is not Attention or not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise ModelError(f"--smaller: layer {layer} uses {type(attn).__name__}"
                             f"{' with a norm or gate over all heads' if type(attn) is Attention else ''}, not timm's "
                             f"plain Attention, so removing heads would change the other heads' output; {works}")


def shrink_attention(attn: nn.Module, kept: list[int]) -> nn.Module:
    """A timm Attention holding only the `kept` heads of `attn` (their qkv rows and proj columns)."""
    from timm.layers import Attention

    proj = attn.proj
    if not kept:
        bias = proj.bias.detach().clone() if proj.bias is not None else proj.weight.new_zeros(proj.out_features)
        return RemovedAttention(bias)
    d, width = attn.head_dim, attn.num_heads * attn.head_dim
    cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept])
    rows = torch.cat([part * width + cols for part in range(3)])
    small = Attention(attn.qkv.in_features, num_heads=len(kept), attn_head_dim=d, dim_out=proj.out_features,
                      qkv_bias=attn.qkv.bias is not None, proj_bias=proj.bias is not None,
                      attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p).to(proj.weight)
    small.q_norm, small.k_norm = copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)  # per head, shared by all
    small.fused_attn = attn.fused_attn
    with torch.no_grad():
        small.qkv.weight.copy_(attn.qkv.weight[rows])
        if attn.qkv.bias is not None:
            small.qkv.bias.copy_(attn.qkv.bias[rows])
        small.proj.weight.copy_(proj.weight[:, cols])
        if proj.bias is not None:
            small.proj.bias.copy_(proj.bias)
    return small


def kept_heads(heads_per_layer: list[int], removed: list[tuple[int, int]]) -> list[list[int]]:
    gone = set(removed)
    return [[h for h in range(n) if (layer, h) not in gone] for layer, n in enumerate(heads_per_layer)]


def smaller_model(model: nn.Module, heads: list[tuple[int, int]]) -> nn.Module:
    """A copy of a plain timm VisionTransformer with `heads` physically removed."""
    check_shrinkable(model, heads)
    small = copy.deepcopy(model)
    counts = [blk.attn.num_heads for blk in model.blocks]
    for layer, kept in enumerate(kept_heads(counts, heads)):
        if len(kept) < counts[layer]:
            small.blocks[layer].attn = shrink_attention(model.blocks[layer].attn, kept)
    return small.eval()


def heads_per_layer_of(model: nn.Module) -> list[int]:
    return [0 if isinstance(b.attn, RemovedAttention) else b.attn.num_heads for b in model.blocks]


def save_smaller(model: nn.Module, path: str, arch: str, num_classes: int, kwargs: dict,
                 kept: list[list[int]]) -> None:
    """A state dict plus what rebuilds its module tree from timm; loads with torch.load(weights_only=True)."""
    torch.save({"format": SMALLER_FORMAT, "model": arch, "num_classes": num_classes, "kwargs": kwargs,
                "heads_per_layer": heads_per_layer_of(model), "kept_heads": kept,
                "state_dict": model.state_dict()}, path)


def load_smaller(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The smaller model saved by `cigma-ray export --smaller`, rebuilt from timm (no run, no scan)."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != SMALLER_FORMAT:
        raise ModelError(f"{path} is not a smaller model written by `cigma-ray export --smaller`")
    model = plain_timm_model(saved["model"], saved["num_classes"], saved["kwargs"])
    for layer, count in enumerate(saved["heads_per_layer"]):
        attn = model.blocks[layer].attn
        if count < attn.num_heads:  # the right shapes; the state dict brings the weights
            model.blocks[layer].attn = shrink_attention(attn, list(range(count)))
    model.load_state_dict(saved["state_dict"])
    return model.to(map_location).eval()
