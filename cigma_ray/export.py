"""`cigma-ray export`: a run's pruned model as files that plain timm can use.

Two forms of the same model, with the chosen heads (the top K of the run's ranking, or a list):

- a state dict of the original timm architecture in which each removed head's W_Q, W_K, W_V
  rows (and biases) and W_O columns are zero: the plain definition of head ablation
  (`engine.reference.zeroed_head`), loadable with `timm.create_model` + `load_state_dict`, with a
  JSON sidecar that says how;
- for timm VisionTransformers, a physically smaller model: the attentions of the pruned layers
  rebuilt with only their kept heads (a layer with none left keeps its projection's bias, the
  attention branch's constant value), which computes the same logits with less work. It is saved
  as a state dict plus the kept heads per layer, and `load_smaller` rebuilds it from timm.

Both are checked against the scan's own keep-mask ablation before the command reports success.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os

import torch
from torch import nn

from . import __version__
from .config import ConfigError, resolve_k
from .models import LoadedModel, ModelError, ModelSpec
from .pipeline import load_scanned, scanned_model_spec
from .storage import RunDir, StorageError

SMALLER_FORMAT = "cigma-ray/smaller-vit/1"
CHECK_INPUTS = 2  # random inputs each saved model is compared on


class RemovedAttention(nn.Module):
    """An attention whose heads were all removed: its output is the projection's bias for any input."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], -1)


# -- the run: which model, which heads ------------------------------------------------------------

def timm_kwargs(spec: ModelSpec) -> dict:
    """The `timm.create_model` keyword arguments of a spec, as the loader passes them (num_classes aside)."""
    return {**spec.model_kwargs, **({"img_size": spec.img_size} if spec.img_size is not None else {})}


def parse_heads(text: str, heads_per_layer: list[int]) -> list[tuple[int, int]]:
    """`3.1,5.0` -> [(3, 1), (5, 0)], each checked against the model's layers and heads."""
    heads = []
    for item in text.split(","):
        layer, dot, head = item.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise ConfigError(f"--heads {text!r}: write LAYER.HEAD items separated by commas, e.g. --heads 3.1,5.0")
        layer, head = int(layer), int(head)
        if layer >= len(heads_per_layer) or head >= heads_per_layer[layer]:
            raise ConfigError(f"--heads: head {layer}.{head} does not exist; the model has {len(heads_per_layer)} "
                              f"layers with heads per layer {heads_per_layer}")
        if (layer, head) in heads:
            raise ConfigError(f"--heads: head {layer}.{head} is named twice")
        heads.append((layer, head))
    return heads


def chosen_heads(run: RunDir, meta: dict, k: int | None, heads: str | None,
                 score: str | None = None) -> tuple[list[tuple[int, int]], str, list[dict]]:
    """(heads to remove, how they were chosen, their ranking rows) for `--k` (by the run's score, or
    `score`) or `--heads`."""
    from .prune import check_k, parse_scores, top_heads

    heads_per_layer = meta["plan"]["heads_per_layer"]
    rankings = run.read_table("rankings.parquet") if run.exists("rankings.parquet") else None
    if heads is not None:
        chosen, how = parse_heads(heads, heads_per_layer), "--heads"
    else:
        if rankings is None:
            raise StorageError(f"{run.url} has no rankings.parquet yet, so it has no top K to export: finish the run "
                               f"by running the scan command that made it again (`cigma-ray scan ... --out {run.url}`), "
                               "or name the heads with --heads LAYER.HEAD,...")
        name = "top_k" if k is None else "--k"
        k = resolve_k(meta["config"]["top_k"], sum(heads_per_layer)) if k is None else k
        check_k(k, sum(heads_per_layer), name)
        if score is not None:
            parse_scores(score, meta)
        score_name = score or meta["config"].get("score", "big_drop")
        chosen, how = top_heads(rankings, k, score=score), f"top {k} of rankings.parquet by {score_name}"
    if rankings is None:
        return chosen, how, []
    by_head = {(r["layer"], r["head"]): r for r in rankings.to_pylist()}
    rows = [{key: None if isinstance(v, float) and math.isnan(v) else v for key, v in by_head[h].items()} for h in chosen]
    return chosen, how, rows


def load_run_model(run: RunDir, meta: dict, checkpoint: str | None) -> tuple[ModelSpec, LoadedModel]:
    """The scanned model (timm only), refusing weights other than the ones the run's ranking belongs to."""
    spec = scanned_model_spec(meta, checkpoint)
    if spec.family != "timm":
        raise ModelError(f"{run.url} scanned {spec.name}; export writes timm models only")
    return spec, load_scanned(run.url, meta, checkpoint=checkpoint)


# -- (a) zeroed weights, same architecture --------------------------------------------------------

def zeroed_state_dict(attentions: list[nn.Module], model: nn.Module, heads: list[tuple[int, int]]) -> dict:
    """The model's state dict with the heads zeroed as the plain definition does; the model is left intact."""
    from .engine.reference import zeroed_head

    with contextlib.ExitStack() as stack:
        for layer, head in heads:
            attn = attentions[layer]
            if not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise ModelError(f"layer {layer}: {type(attn).__name__} has no fused qkv projection, so its heads "
                                 "cannot be exported as zeroed weights")
            stack.enter_context(zeroed_head(attn, head))
        return {name: value.detach().clone() for name, value in model.state_dict().items()}


def attentions_of(loaded: LoadedModel) -> list[nn.Module]:
    """The attention modules the adapter addresses, in layer order."""
    from .models.timm_generic import find_attentions
    from .models.timm_vit import TimmViTAdapter

    model = loaded.adapter.model
    return [b.attn for b in model.blocks] if isinstance(loaded.adapter, TimmViTAdapter) else find_attentions(model)


def plain_timm_model(arch: str, num_classes: int, kwargs: dict, state_dict: dict | None = None) -> nn.Module:
    """What a user of timm does: create the architecture without downloads, then load the weights."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


# -- (b) a physically smaller ViT -----------------------------------------------------------------

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


# -- the command ----------------------------------------------------------------------------------

def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_state_dict(state_dict: dict, path: str) -> str:
    """Write a state dict (safetensors by suffix, else torch.save); returns the code that loads it."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, path)
        return f"from safetensors.torch import load_file\nmodel.load_state_dict(load_file({path!r}))"
    torch.save(state_dict, path)
    return f"model.load_state_dict(torch.load({path!r}, weights_only=True))"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def export_run(url: str, out: str, k: int | None = None, heads: str | None = None, smaller: str | None = None,
               checkpoint: str | None = None, score: str | None = None) -> dict:
    """Write the pruned model of a run (and optionally its smaller form); returns the sidecar's content."""
    from .cli import open_run
    from .engine import Replica

    run = open_run(url)
    meta = run.read_json("run.json")
    removed, how, rows = chosen_heads(run, meta, k, heads, score)
    spec, loaded = load_run_model(run, meta, checkpoint)
    arch, kwargs, num_classes = spec.arch, timm_kwargs(spec), loaded.num_classes

    zeroed = zeroed_state_dict(attentions_of(loaded), loaded.adapter.model, removed)
    model = plain_timm_model(arch, num_classes, kwargs, zeroed)
    x = torch.randn(CHECK_INPUTS, 3, *loaded.adapter.input_size, generator=torch.Generator().manual_seed(0))
    replica = Replica(loaded)
    reference = replica.logits(x, replica.keep_without(removed))
    with torch.inference_mode():
        logits = model(x)
    tolerance = 1e-4 * (1 + float(reference.abs().max()))
    if max_diff(logits, reference) > tolerance:
        raise ModelError(f"for {spec.name}, zeroing the heads' weights does not reproduce the scan's ablation "
                         f"(max |logit difference| {max_diff(logits, reference):.2e}): its attention modules "
                         f"({type(attentions_of(loaded)[0]).__name__}) mix heads before the output projection")

    small = smaller_model(model, removed) if smaller is not None else None
    if small is not None:
        with torch.inference_mode():
            diff = max_diff(small(x), logits)
        if diff > tolerance:
            raise RuntimeError(f"the smaller {arch} differs from the zeroed one by {diff:.2e} in the logits; "
                               "please report this with the run's run.json")

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    load_code = save_state_dict(zeroed, out)
    args = "".join(f", {key}={value!r}" for key, value in kwargs.items())
    info = {
        "model": arch, "create_model_kwargs": kwargs, "num_classes": num_classes, "file": out,
        "parameters": parameters(model),
        "removed_heads": rows or [{"layer": l, "head": h} for l, h in removed], "selection": how,
        "heads_per_layer": loaded.adapter.heads_per_layer,
        "source": {"run": run.url, "weights": meta["model"]["weights"], "cigma_ray": __version__},
        "check": {"inputs": CHECK_INPUTS, "max_abs_logit_diff_vs_keep_mask": max_diff(logits, reference)},
        "load": f"import timm, torch\nmodel = timm.create_model({arch!r}, pretrained=False, "
                f"num_classes={num_classes}{args})\n{load_code}\nmodel.eval()",
        "smaller": None,
    }
    if small is not None:
        os.makedirs(os.path.dirname(os.path.abspath(smaller)), exist_ok=True)
        save_smaller(small, smaller, arch, num_classes, kwargs, kept_heads(loaded.adapter.heads_per_layer, removed))
        info["smaller"] = {"file": smaller, "parameters": parameters(small), "heads_per_layer": heads_per_layer_of(small),
                           "max_abs_logit_diff_vs_zeroed": diff,
                           "load": f"from cigma_ray.export import load_smaller\nmodel = load_smaller({smaller!r})"}
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def cmd_export(args: argparse.Namespace) -> int:
    info = export_run(args.run, args.out, k=args.k, heads=args.heads, smaller=args.smaller, checkpoint=args.checkpoint,
                      score=args.score)
    named = " ".join(f"{r['layer']}.{r['head']}" for r in info["removed_heads"])
    print(f"removed {len(info['removed_heads'])} heads ({info['selection']}): {named}")
    print(f"wrote {info['file']} (timm {info['model']}, the heads' weights zeroed; {info['parameters']:,} parameters) "
          f"and {info['file']}.json (how to load it)")
    print(f"  equals the scan's keep-mask ablation: max |logit difference| "
          f"{info['check']['max_abs_logit_diff_vs_keep_mask']:.1e} on {CHECK_INPUTS} random inputs")
    small = info["smaller"]
    if small:
        print(f"wrote {small['file']} (heads per layer {' '.join(map(str, small['heads_per_layer']))}; "
              f"{small['parameters']:,} parameters, {small['parameters'] / info['parameters'] - 1:+.1%}); "
              "load with cigma_ray.export.load_smaller")
        print(f"  equals {info['file']}: max |logit difference| {small['max_abs_logit_diff_vs_zeroed']:.1e}")
    return 0


def add_export_parser(subparsers) -> None:
    """Register `export` on the `cigma-ray` sub-command parser."""
    p = subparsers.add_parser("export", help="write a run's pruned model: timm weights with the top-K heads zeroed, "
                              "and optionally a smaller model without them",
                              description="Remove the top K heads of a run's ranking (or the --heads named) from the "
                              "model the run scanned. --out gets a state dict of the same timm architecture with "
                              "those heads' W_Q, W_K, W_V rows and W_O columns zeroed, and --out.json says how to "
                              "load it with plain timm. --smaller also writes a physically smaller model (timm "
                              "VisionTransformers only), loaded with cigma_ray.export.load_smaller.")
    p.add_argument("run", help="run directory with a rankings.parquet")
    p.add_argument("--out", required=True, metavar="FILE", help="state dict to write (.pth, .pt, or .safetensors)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--k", type=int, help="remove the run's top K heads (default: the run's top_k)")
    which.add_argument("--heads", metavar="L.H,...", help="remove these heads instead, e.g. 3.1,5.0")
    p.add_argument("--score", help="with --k: rank by this score of the run (big_drop, bir_drop, big_minus_fig; "
                   "default: the run's score key)")
    p.add_argument("--smaller", metavar="FILE", help="also write the model with those heads physically removed")
    p.add_argument("--checkpoint", metavar="FILE", help="the weights the run scanned, if the file has moved since (checked against "
                   "the run's sha256)")
    p.set_defaults(func=cmd_export)
