"""The scan's speed against its yardsticks, measured together (`cigma-ray bench`).

Per model, on one device, precision and image size: the plain forward rate (the practical
roofline), the paper-style weight-zeroing loop, the engine's exact scan, and the mask stage
against its bound. Rates only compare within one run, so the suite measures them all in the same
process and keeps them with the machine they came from (`machine`).
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..engine import PRECISIONS, Replica
from ..engine.reference import scan_by_weight_zeroing
from ..method import counterfactuals, foreground_cells, head_scores, ranks
from ..models import LoadedModel, ModelSpec, load
from ..models.attention import find_attentions

DEFAULTS = {
    "cpu": {"models": ["vit_tiny_patch16_224"], "precision": "fp32", "images": 6, "batch_sizes": [1, 8, 32],
            "mask_steps": 5},
    "cuda": {"models": ["vit_base_patch16_224", "vit_large_patch16_224"], "precision": "bf16", "images": 64,
             "batch_sizes": [32, 64, 128, 256, 512], "mask_steps": 10},
}
# The targets, per (device type, precision); other settings are measured without one.
TARGETS = {
    ("cpu", "fp32"): {"engine_over_paper_loop": 1.7},
    ("cuda", "bf16"): {"engine_over_forward": 1.2, "engine_over_paper_loop": 5.0, "masks_over_bound": 1.2},
}
MASK_BOUND = "forward_best / (3 x steps) masks/s: a mask step is a forward and a backward (~3 forwards)"
BF16_SEEDS = (0, 1, 2)
TOP_K = 16
EXACT_IMAGES = 2  # images of the fp32 exactness check when the timed runs are in bf16


@dataclass
class Settings:
    models: list[str]
    device: str
    precision: str
    images: int
    batch_sizes: list[int]
    mask_steps: int
    repeats: int
    img_size: int | None
    bf16_check: bool
    results: str


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in ("torch", "timm", "ray", "numpy")}}


def machine() -> dict:
    """Where numbers came from: they only compare with numbers from the same machine."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "torch_threads": torch.get_num_threads(), **versions()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def device_name(device: torch.device, info: dict) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]


def best_times(calls: dict[str, Callable[[], object]], device: torch.device,
               repeats: int) -> dict[str, tuple[float, object]]:
    """{name: (best wall time, last result)} of each call over `repeats` rounds, after one warm-up each.

    The calls alternate within a round, so a machine that gets busier for a while slows all of
    them alike instead of skewing their ratios.
    """
    results = {name: fn() for name, fn in calls.items()}
    best = dict.fromkeys(calls, float("inf"))
    for round_ in range(1, repeats + 1):
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
        log(f"  round {round_}/{repeats}: {', '.join(f'{name} {best[name]:.2f} s' for name in calls)}")
    return {name: (best[name], results[name]) for name in calls}


def inputs(lm: LoadedModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images at the model's input size and random foreground cells (the default 35%)."""
    cfg = Config()
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *lm.adapter.input_size, generator=gen)
    fg = foreground_cells(torch.rand(n, cfg.mask_size, cfg.mask_size, generator=gen), cfg.keep_ratio)
    return images, fg


def curve_summary(points: list[dict], key: str) -> dict:
    best = max(points, key=lambda p: p[key])
    return {"points": points, f"best_{key}": best[key], "best_batch_size": best["batch_size"]}


def paper_loop(lm: LoadedModel, device: torch.device, precision: str, images: torch.Tensor, fg: torch.Tensor,
               batch_size: int) -> torch.Tensor:
    """BIG^(-h) the paper's way: weights zeroed, whole model twice per head and image."""
    replica = Replica(lm, str(device), precision, batch_size)
    no_bg, _ = counterfactuals(images, fg)
    x, x_no_bg = replica.upload(images), replica.upload(no_bg)
    model = lm.adapter.model
    with replica.autocast():
        return scan_by_weight_zeroing(model, find_attentions(model), x, x_no_bg, lm.adapter.heads, Config().tau,
                                      batch_size).big


def max_difference_fp32(lm: LoadedModel, device: torch.device, images: torch.Tensor, fg: torch.Tensor,
                        batch_size: int) -> float:
    """max |engine - loop| with both in fp32, the only precision where the engine claims exactness."""
    engine = Replica(lm, str(device), "fp32", batch_size).scan(images, fg, lm.adapter.heads, Config().tau).big
    return float((engine - paper_loop(lm, device, "fp32", images, fg, batch_size)).abs().max())


def mask_summary(images: int, steps: int, with_steps: float, fixed: float, forward_best: float) -> dict:
    """Replica.masks against forward_best / (3 x steps), from its time at `steps` and at 0 steps.

    A mask also costs a fixed ~4 forwards (the prediction it keeps, then FIG and BIG), which
    vanish at the run's 250 steps but not at the few steps timed here; the call with 0 steps
    measures them, and the ratio is taken on the steps alone.
    """
    image_steps_per_s = images * steps / (with_steps - fixed)
    return {"steps": steps, "images": images, "masks_per_s": images / with_steps, "fixed_seconds": fixed,
            "image_steps_per_s": image_steps_per_s, "steps_only_masks_per_s": image_steps_per_s / steps,
            "bound_masks_per_s": forward_best / (3 * steps), "bound": MASK_BOUND}


def head_score(replica: Replica, images: torch.Tensor, fg: torch.Tensor, heads: list[tuple[int, int]]) -> np.ndarray:
    """CIGMA score per head as a run computes it: BIG of the intact model minus BIG^(-h), averaged over images."""
    tau = Config().tau
    _, big = replica.gains(images, fg, tau)
    ablated = replica.scan(images, fg, heads, tau).big.numpy().astype(np.float64)
    return head_scores(big.numpy().astype(np.float64)[None, :] - ablated, bootstrap=0)["score"]


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    r = float(np.corrcoef(a, b)[0, 1])
    return r if np.isfinite(r) else None


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float | None:
    """Kendall's tau-b; O(heads^2), cheap for a few hundred heads."""
    sa, sb = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    denominator = np.sqrt((sa * sa).sum() * (sb * sb).sum())
    return float((sa * sb).sum() / denominator) if denominator else None


def bf16_top_k(lm: LoadedModel, device: torch.device, n_images: int, batch_size: int) -> dict:
    """How much bf16 moves the ranking: top-k overlap and rank correlations against fp32, per image seed."""
    heads = lm.adapter.heads
    k = max(1, min(TOP_K, len(heads) // 2))
    replicas = {p: Replica(lm, str(device), p, batch_size) for p in PRECISIONS}
    per_seed = []
    for seed in BF16_SEEDS:
        images, fg = inputs(lm, n_images, seed)
        scores = {p: head_score(replicas[p], images, fg, heads) for p in PRECISIONS}
        rank = {p: ranks(s) for p, s in scores.items()}
        top = {p: set(np.flatnonzero(r <= k)) for p, r in rank.items()}
        per_seed.append({"seed": seed, "overlap": len(top["fp32"] & top["bf16"]) / k,
                         "spearman": correlation(rank["fp32"], rank["bf16"]),
                         "kendall": kendall_tau(scores["fp32"], scores["bf16"])})
        log(f"  bf16 check, seed {seed}: top-{k} overlap {per_seed[-1]['overlap']:.2f}")
    overlaps = [s["overlap"] for s in per_seed]
    return {"k": k, "images": n_images, "seeds": per_seed, "mean_overlap": float(np.mean(overlaps)),
            "changed": sum(o < 1 for o in overlaps)}


def run_bench(model: str, device: str, precision: str, images: int, batch_sizes: list[int], mask_steps: int,
              repeats: int, img_size: int | None = None, bf16_check: bool = True) -> dict:
    """Every measurement of one model, on random weights (speed and exactness do not depend on them)."""
    dev = torch.device(device)
    log(f"{model}: loading")
    lm = load(ModelSpec(f"timm:{model}", img_size=img_size, random_weights=True), dev)
    heads = lm.adapter.heads
    tau = Config().tau
    x, fg = inputs(lm, images, seed=0)
    x_forward = inputs(lm, max(*batch_sizes, images), seed=0)[0].to(dev)  # on the device: the model alone
    replicas = {size: Replica(lm, device, precision, size) for size in batch_sizes}
    mask_replica = Replica(lm, device, precision)
    mask_cfg = Config(mask_steps=mask_steps, mask_batch=images)
    loop_batch = min(images, max(batch_sizes))  # the loop batches the images of one head at a time
    calls = {
        **{f"forward {size}": lambda r=replicas[size], n=max(size, images): r.logits(x_forward[:n])
           for size in batch_sizes},
        **{f"engine {size}": lambda r=replicas[size]: r.scan(x, fg, heads, tau).big for size in batch_sizes},
        # the scan with FIG^(-h) too (config measure_fig), at the largest batch: 3 forwards per pair instead of 2
        "engine+fig": lambda r=replicas[max(batch_sizes)]: r.scan(x, fg, heads, tau, measure_fig=True).big,
        "paper loop": lambda: paper_loop(lm, dev, precision, x, fg, loop_batch),
        f"masks {mask_steps} steps": lambda: mask_replica.masks(x, mask_cfg),
        "masks 0 steps": lambda: mask_replica.masks(x, mask_cfg.replace(mask_steps=0)),
    }
    times = best_times(calls, dev, repeats)
    seconds = {name: t for name, (t, _) in times.items()}

    forward = curve_summary([{"batch_size": size, "batch_size_run": replicas[size].batch_size,
                              "images_per_s": max(size, images) / seconds[f"forward {size}"]}
                             for size in batch_sizes], "images_per_s")
    engine = curve_summary([{"batch_size": size, "batch_size_run": replicas[size].batch_size,
                             "pairs_per_s": len(heads) * images / seconds[f"engine {size}"]}
                            for size in batch_sizes], "pairs_per_s")
    loop = {"pairs_per_s": len(heads) * images / seconds["paper loop"], "batch_size": loop_batch}
    masks = mask_summary(images, mask_steps, seconds[f"masks {mask_steps} steps"], seconds["masks 0 steps"],
                         forward["best_images_per_s"])
    if precision == "fp32":
        engine_out, loop_out = times[f"engine {engine['best_batch_size']}"][1], times["paper loop"][1]
        difference = float((engine_out - loop_out).abs().max())
        exact_images = images
    else:
        exact_images = min(images, EXACT_IMAGES)
        difference = max_difference_fp32(lm, dev, x[:exact_images], fg[:exact_images], engine["best_batch_size"])

    ratios = {"engine_over_forward": engine["best_pairs_per_s"] / forward["best_images_per_s"],
              "engine_over_paper_loop": engine["best_pairs_per_s"] / loop["pairs_per_s"],
              "masks_over_bound": masks["steps_only_masks_per_s"] / masks["bound_masks_per_s"],
              "fig_cost": seconds["engine+fig"] / seconds[f"engine {max(batch_sizes)}"]}
    targets = TARGETS.get((dev.type, precision), {})
    return {
        "model": model, "params_millions": sum(p.numel() for p in lm.adapter.model.parameters()) / 1e6,
        "layers": lm.adapter.num_layers, "heads": len(heads), "input_size": list(lm.adapter.input_size),
        "images": images, "forward": forward, "engine": engine, "paper_loop": loop, "masks": masks,
        "ratios": ratios,
        "targets": {name: {"target": target, "pass": ratios[name] >= target} for name, target in targets.items()},
        "max_abs_engine_minus_loop_fp32": difference, "exactness_images": exact_images,
        "bf16_top_k": bf16_top_k(lm, dev, images, engine["best_batch_size"]) if bf16_check else None,
    }


def run_suite(settings: Settings) -> dict:
    info = machine()
    return {
        "benchmark": "bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": settings.device, "device_name": device_name(torch.device(settings.device), info),
        "precision": settings.precision, "machine": info, "settings": asdict(settings),
        "models": [run_bench(m, settings.device, settings.precision, settings.images, settings.batch_sizes,
                             settings.mask_steps, settings.repeats, settings.img_size, settings.bf16_check)
                   for m in settings.models],
    }


def file_stem(result: dict) -> str:
    """bench-MODELS-DEVICE_TYPE-DEVICE_NAME-PRECISION-DATE: one file per machine and setting per day."""
    name = re.sub(r"[^a-z0-9]+", "-", result["device_name"].lower()).strip("-")
    models = "+".join(m["model"] for m in result["models"])
    return (f"bench-{models}-{torch.device(result['device']).type}-{name}-{result['precision']}-"
            f"{result['date'][:10]}")
