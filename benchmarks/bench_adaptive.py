"""Replay the adaptive scan on a finished exhaustive run: the ablated forwards it would have used.

    python benchmarks/bench_adaptive.py RUN [--score big_drop] [--top-k 16] [--delta 0.05]
                                            [--scales 1,4,16] [--resamples 3] [--json FILE]
    python benchmarks/bench_adaptive.py --build-wide OUT [--images 4000] [--depth 10] [--heads 32]

The first form reads RUN's deltas/ into a (heads x images) matrix of the score's terms (as the
ranking does), runs `method.adaptive` on it with no model, and prints the pairs (and ablated
forwards: 2 per pair, 3 with measure_fig) it measured against the exhaustive scan, whether its
top-K set equals the exhaustive one, and the same on bootstrap resamples of D at 1x, 4x and 16x
its size (the saving grows with N: the images a decision needs do not).

The second form first builds a run with some hundreds of heads on a CPU budget: a random-weight
timm ViT (depth x heads, by default 10 x 32 = 320 heads, width 64, 32 px, 4 patches), perturbed so that
heads matter, on generated two-class shape images (the demo's generator), tp_ratio 1.0,
mask_steps 10 and measure_fig false (cheap settings, said in the output), then replays it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from cigma_ray.config import Config, resolve_k
from cigma_ray.method import SCORES
from cigma_ray.method.adaptive import population, replay, replay_resampled


def run_matrices(url: str) -> dict:
    """A finished run's (heads, images) matrices of every score it measured, D's BIG and FIG, and its shape.

    Reads the run the way the ranking does (pipeline.score_matrices over the scan units); after the
    package's restructure only this function needs to follow the run directory's new home.
    """
    from cigma_ray.pipeline import scan_units, score_matrices, select_images
    from cigma_ray.storage import RunDir

    run = RunDir(url)
    meta = run.read_json("run.json")
    cfg = Config(**meta["config"])
    if cfg.rounds != 1:
        raise SystemExit(f"{url}: an iterative run (rounds={cfg.rounds}); replay a single-round scan")
    preds = run.read_folder("predictions", columns=["image_id", "correct"])
    selected = sorted(select_images(preds.filter(preds["correct"])["image_id"].to_pylist(), cfg.tp_ratio, cfg.seed))
    per_layer = meta["plan"]["heads_per_layer"]
    heads = [(layer, h) for layer, n in enumerate(per_layer) for h in range(n)]
    units = scan_units(selected, cfg, per_layer)
    names = list(SCORES) if cfg.measure_fig else ["big_drop"]
    matrices = score_matrices(run, units, heads, selected, names)
    masks = run.read_folder("masks", columns=["image_id", "fig", "big"]).sort_by("image_id")
    ids = masks["image_id"].to_numpy()
    if not np.array_equal(ids, np.asarray(selected)):
        raise SystemExit(f"{url}: masks/ does not hold exactly the images of D")
    return {"cfg": cfg, "heads": heads, "images": len(selected), "matrices": matrices,
            "big": masks["big"].to_numpy(), "fig": masks["fig"].to_numpy(),
            "views": 3 if cfg.measure_fig else 2, "model": meta["model"]["name"]}


def bench(url: str, score: str | None, top_k, delta: float, scales: list[int], resamples: int,
          first: int, growth: float, bound: str, bet_cap: float, offsets: bool) -> dict:
    data = run_matrices(url)
    cfg = data["cfg"]
    score = score or cfg.score
    if score not in data["matrices"]:
        raise SystemExit(f"{url}: score {score} needs measure_fig; this run has {', '.join(data['matrices'])}")
    matrix = data["matrices"][score]
    k = resolve_k(top_k if top_k is not None else cfg.top_k, len(data["heads"]))
    off, low, high = population(score, data["big"], data["fig"]) if offsets else population(score)
    options = dict(delta=delta, first=first, growth=growth, bound=bound, bet_cap=bet_cap)
    views = data["views"]
    start = time.perf_counter()
    res = replay(matrix, k, low=low, high=high, offsets=off, seed=cfg.seed, **options)
    rows = [{"scale": "D", "images": data["images"], "pairs": res.pairs, "exhaustive_pairs": res.exhaustive_pairs,
             "saving": res.saving, "matched": res.extra["matched"], "rounds": res.rounds}]
    rows += replay_resampled(matrix, k, low=low, high=high, offsets=off, scales=tuple(scales), resamples=resamples,
                             seed=cfg.seed, **options)
    seconds = time.perf_counter() - start
    # the same replays with a normal-approximation interval: no guarantee, a reference for what the data allow
    ref_options = {**options, "bound": normal_interval}
    ref = replay(matrix, k, low=low, high=high, offsets=off, seed=cfg.seed, **ref_options)
    refs = [ref.saving] + [r["saving"] for r in replay_resampled(matrix, k, low=low, high=high, offsets=off,
                                                                  scales=tuple(scales), resamples=resamples,
                                                                  seed=cfg.seed, **ref_options)]
    for r, saving in zip(rows, refs):
        r["normal_reference_saving"] = saving
    means = np.sort(matrix.mean(axis=1))[::-1]
    print(f"run       {url}: {data['model']}, {len(data['heads'])} heads, D = {data['images']} images, "
          f"{views} ablated forwards per (head, image) pair{' (measure_fig)' if views == 3 else ''}")
    print(f"adaptive  score {score}, K = {k}, delta = {delta}, bound {bound} (bet cap {bet_cap}), "
          f"{'per-image offsets from BIG' if off is not None else 'no offsets'}, rounds from {first} images x{growth}")
    print(f"scores    K-th {means[k - 1]:+.5f}, (K+1)-th {means[k] if k < len(means) else float('nan'):+.5f}, "
          f"median {np.median(means):+.5f}; per-image spread of the terms (std over D, median over heads) "
          f"{np.median(matrix.std(axis=1)):.5f}")
    print(f"{'D':>12} {'images':>7} {'rounds':>6} {'ablated forwards':>17} {'exhaustive':>12} {'saving':>7}  top-K set"
          f"  {'normal ref.':>11}")
    for r in rows:
        label = "as scanned" if r["scale"] == "D" else f"{r['scale']}x resample"
        print(f"{label:>12} {r['images']:>7} {r['rounds']:>6} {r['pairs'] * views:>17,} {r['exhaustive_pairs'] * views:>12,} "
              f"{r['saving']:>6.2f}x  {'same' if r['matched'] else 'DIFFERENT':>9}  {r['normal_reference_saving']:>10.2f}x")
    for scale in scales:
        got = [r for r in rows if r["scale"] == scale]
        if len(got) > 1:
            s = [r["saving"] for r in got]
            print(f"{scale:>3}x: saving {np.mean(s):.2f}x mean of {len(s)} (min {min(s):.2f}, max {max(s):.2f}), "
                  f"top-K set equal in {sum(r['matched'] for r in got)}/{len(got)}")
    decided = res.decided
    print(f"heads     as scanned: {int((decided == 'in').sum())} decided in early, {int((decided == 'out').sum())} "
          f"out early, {int((decided == '').sum())} measured on all {data['images']} images; replays took {seconds:.1f} s")
    return {"run": url, "model": data["model"], "heads": len(data["heads"]), "images": data["images"], "views": views,
            "score": score, "k": k, "delta": delta, "bound": bound, "bet_cap": bet_cap, "first": first, "growth": growth,
            "offsets": off is not None, "rows": rows, "machine": machine()}


def normal_interval(z: np.ndarray, n_total: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """mean +- z_(1 - alpha/2) x std x sqrt((1 - n/N) / n): the normal approximation with the finite-population
    factor (union over heads and rounds like Hoeffding-Serfling). NOT a guarantee: rare large terms break it;
    the benchmark prints its saving only as a reference for what any bound could save on these data."""
    from statistics import NormalDist

    h, n = z.shape
    total = z.sum(axis=1)
    det_low, det_high = total / n_total, (total + n_total - n) / n_total
    if n < 2 or n == n_total:
        return det_low, det_high
    half = NormalDist().inv_cdf(1 - alpha / 2) * z.std(axis=1, ddof=1) * np.sqrt((1 - n / n_total) / n)
    mean = total / n
    return np.maximum(det_low, mean - half), np.minimum(det_high, mean + half)


def machine() -> str:
    import os

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs, {platform.system()}"


def build_wide(out: str, images: int, depth: int, heads: int, width: int, mask_steps: int, seed: int,
               scale: float) -> str:
    """The >= 300-head run described in the module docstring; returns its URL."""
    import timm
    import torch
    from PIL import Image

    from cigma_ray.data.demo import make_image
    from cigma_ray.models import ModelSpec
    from cigma_ray.pipeline import Job, Pipeline

    root = Path(out)
    data = root.parent / f"{root.name}-data"
    if not (data / "done").exists():
        rng = np.random.default_rng(seed)
        for label in (0, 1):
            (data / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            label = i % 2
            background = label if rng.random() < 0.9 else 1 - label
            Image.fromarray(make_image(rng, label, background)).save(data / str(label) / f"{i:05d}.png",
                                                                     compress_level=1)
        (data / "done").touch()
    kwargs = dict(img_size=32, patch_size=16, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=1.0)
    checkpoint = root.parent / f"{root.name}-model.pth"
    if not checkpoint.exists():
        torch.manual_seed(seed)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)
        torch.save(model.state_dict(), checkpoint)
    cfg = Config(tp_ratio=1.0, mask_steps=mask_steps, measure_fig=False, bootstrap=0, unit_images=500,
                 batch_size=2048, top_k=16)
    spec = ModelSpec("timm:vit_tiny_patch16_224", checkpoint=str(checkpoint), num_classes=2,
                     model_kwargs={k: v for k, v in kwargs.items()})
    start = time.perf_counter()
    Pipeline(Job(model=spec, data=str(data), out=str(root), config=cfg)).run_all()
    print(f"built     {root}: timm ViT depth {depth} x {heads} heads, width {width}, 32 px (4 patches), random "
          f"weights + N(0, {scale}^2) noise; {images} generated images; tp_ratio 1.0, mask_steps {mask_steps}, "
          f"measure_fig false; {time.perf_counter() - start:.0f} s")
    return str(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a finished exhaustive run directory (local or URL)")
    p.add_argument("--score", choices=list(SCORES), help="default: the run's config score")
    p.add_argument("--top-k", type=lambda s: float(s) if "." in s else int(s), help="default: 16")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--scales", default="1,4,16", help="bootstrap resamples of D at these multiples of its size")
    p.add_argument("--resamples", type=int, default=3, help="replays per scale")
    p.add_argument("--first", type=int, default=32, help="images in the first round")
    p.add_argument("--growth", type=float, default=1.2, help="images per round grow by this factor")
    p.add_argument("--bound", default="betting", choices=["betting", "hoeffding_serfling"])
    p.add_argument("--bet-cap", type=float, default=0.9)
    p.add_argument("--offsets", action="store_true", help="bound -BIG_i^(-h) with offsets BIG_i (method.adaptive.population)")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--build-wide", metavar="OUT", help="first build the many-heads run at OUT, then replay it")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--mask-steps", type=int, default=10)
    p.add_argument("--perturb", type=float, default=0.3)
    args = p.parse_args(argv)
    url = args.run
    if args.build_wide:
        url = build_wide(args.build_wide, args.images, args.depth, args.heads, args.width, args.mask_steps, 0,
                         args.perturb)
    if not url:
        p.error("give a RUN or --build-wide OUT")
    result = bench(url, args.score, 16 if args.top_k is None else args.top_k, args.delta,
                   [int(s) for s in args.scales.split(",") if s], args.resamples, args.first, args.growth,
                   args.bound, args.bet_cap, args.offsets)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
