"""A run's pruned model as files that plain timm can use (`cigma-ray export`).

The chosen heads (the top K of the run's ranking, or a list) are removed from the model the run
scanned, as zeroed weights of the same timm architecture and optionally as a physically smaller
model (models/surgery.py); both are checked against the scan's own keep-mask ablation before the
files count as written.
"""
from __future__ import annotations

import json
import math
import os

import torch

from . import __version__
from .config import ConfigError
from .engine import Replica
from .models import ModelError
from .models.surgery import (
    attentions_of,
    heads_per_layer_of,
    kept_heads,
    output_heads_state_dict,
    parameters,
    plain_timm_model,
    save_smaller,
    smaller_model,
    timm_kwargs,
    zeroed_state_dict,
)
from .rundir import Run, StorageError, open_run

CHECK_INPUTS = 2  # random inputs each saved model is compared on


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


def chosen_heads(run: Run, k: int | None, heads: str | None,
                 score: str | None = None) -> tuple[list[tuple[int, int]], str, list[dict]]:
    """(heads to remove, how they were chosen, their ranking rows) for `--k` (by the run's score, or
    `score`) or `--heads`."""
    rankings = run.rankings() if run.dir.exists("rankings.parquet") else None
    if heads is not None:
        chosen, how = parse_heads(heads, run.heads_per_layer), "--heads"
    else:
        if rankings is None:
            raise StorageError(f"{run.url} has no rankings.parquet yet, so it has no top K to export: finish the run "
                               f"by running the scan command that made it again (`cigma-ray scan ... --out {run.url}`), "
                               "or name the heads with --heads LAYER.HEAD,...")
        k = run.resolve_k(k)
        if score is not None:
            run.parse_scores(score)
        score_name = score or run.score
        chosen, how = run.top_heads(k, score), f"top {k} of rankings.parquet by {score_name}"
    if rankings is None:
        return chosen, how, []
    by_head = {(r["layer"], r["head"]): r for r in rankings.to_pylist()}
    rows = [{key: None if isinstance(v, float) and math.isnan(v) else v for key, v in by_head[h].items()} for h in chosen]
    return chosen, how, rows


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


def run_means(loaded) -> list | None:
    """The substitutes of a mean-ablation run (installed by Run.load_model), or None for zero ablation."""
    means = loaded.adapter.gates.means
    return None if all(m is None for m in means) else means


def export_hf(run: Run, out: str, removed: list[tuple[int, int]], how: str, rows: list[dict], smaller: str | None,
              checkpoint: str | None) -> dict:
    """A Hugging Face run's pruned model as a state dict of its plain transformers class: each removed head's
    output-projection columns zeroed (W_O), and with mean ablation its mean folded into that projection's bias."""
    from .models.hf.plain import load_into, plain_model

    if smaller is not None:
        raise ModelError("--smaller: only timm VisionTransformers can be made physically smaller; the state dict "
                         "(--out without --smaller) works for this model")
    spec = run.model_spec(checkpoint)
    loaded = run.load_model("cpu", checkpoint)
    plain, pairs, cls, prefix = plain_model(loaded, spec)
    state = output_heads_state_dict(plain, pairs, removed, run_means(loaded))
    x = torch.randn(CHECK_INPUTS, 3, *loaded.adapter.input_size, generator=torch.Generator().manual_seed(0))
    replica = Replica(loaded)
    reference = replica.logits(x, replica.keep_without(removed))
    fresh = open_run(run.url).load_model("cpu", checkpoint)
    fresh.adapter.gates.set_means(None)
    load_into(fresh, state, prefix)
    with torch.inference_mode():
        logits = fresh.adapter.logits(x)
    diff = max_diff(logits, reference)
    if diff > 1e-4 * (1 + float(reference.abs().max())):
        raise RuntimeError(f"the exported {cls} differs from the scan's ablation by {diff:.2e} in the logits; please "
                           "report this with the run's run.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    load_code = save_state_dict(state, out)
    path = spec.arch
    info = {"model": cls, "model_dir": path, "file": out, "ablation": run.ablation, "parameters": parameters(plain),
            "removed_heads": rows or [{"layer": l, "head": h} for l, h in removed], "selection": how,
            "heads_per_layer": loaded.adapter.heads_per_layer, "layer_labels": loaded.adapter.layer_labels,
            "source": {"run": run.url, "weights": run.meta["model"]["weights"], "cigma_ray": __version__},
            "check": {"inputs": CHECK_INPUTS, "max_abs_logit_diff_vs_keep_mask": diff},
            "load": f"import torch, transformers\nmodel = transformers.{cls}.from_pretrained({path!r})\n{load_code}\n"
                    "model.eval()",
            "smaller": None}
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def export_run(url: str, out: str, k: int | None = None, heads: str | None = None, smaller: str | None = None,
               checkpoint: str | None = None, score: str | None = None) -> dict:
    """Write the pruned model of a run (and optionally its smaller form); returns the sidecar's content."""
    run = open_run(url)
    meta = run.meta
    removed, how, rows = chosen_heads(run, k, heads, score)
    spec = run.model_spec(checkpoint)
    if spec.family == "hf":
        return export_hf(run, out, removed, how, rows, smaller, checkpoint)
    if spec.family != "timm":
        raise ModelError(f"{run.url} scanned {spec.name}; export writes timm and Hugging Face models only")
    loaded = run.load_model("cpu", checkpoint)
    arch, kwargs, num_classes = spec.arch, timm_kwargs(spec), loaded.num_classes
    means = run_means(loaded)

    zeroed = zeroed_state_dict(attentions_of(loaded), loaded.adapter.model, removed, means)
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
        "ablation": run.ablation, "parameters": parameters(model),
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
                           "load": f"from cigma_ray.models.surgery import load_smaller\nmodel = load_smaller({smaller!r})"}
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info
