"""Replay the adaptive scan on a finished exhaustive run, beyond `cigma-ray bench adaptive RUN`: other bounds, a
normal-approximation reference, and the many-heads run the README's numbers come from.

    python benchmarks/bench_adaptive.py RUN [--order screen] [--top-k 16] [--delta 0.05] [--scales 1,4,16]
                                            [--resamples 3] [--bound betting] [--json FILE]
    python benchmarks/bench_adaptive.py --build-wide OUT [--images 4000] [--depth 10] [--heads 32]

The first form is `cigma-ray bench adaptive` (cigma_ray/bench/adaptive.py: the run's deltas as a (heads x
images) matrix of the score's terms, replayed with no model, as scanned and on bootstrap resamples of D at
several multiples of its size), plus the same replays with a normal-approximation interval, which has no
guarantee and only shows what the data would allow a bound that knew the terms' distribution.

The second form first builds a run with some hundreds of heads on a CPU budget: a random-weight
timm ViT (depth x heads, by default 10 x 32 = 320 heads, width 64, 32 px, 4 patches), perturbed so that
heads matter, on generated two-class shape images (the demo's generator), tp_ratio 1.0,
mask_steps 10 and measure_fig false (cheap settings, said in the output), then replays it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cigma_ray.bench.adaptive import AdaptiveBench, replay_bench
from cigma_ray.config import Config
from cigma_ray.reports.bench import adaptive_bench_text


def bench(url: str, top_k, delta: float, scales: list[int], resamples: int, order: str, bound: str,
          reference: bool) -> dict:
    s = AdaptiveBench(run=url, delta=delta, top_k=top_k, scales=tuple(scales), resamples=resamples, order=order,
                      bound=bound)
    result = replay_bench(s)
    print(adaptive_bench_text(result))
    if reference:  # the same replays with a normal-approximation interval: no guarantee, a reference only
        ref = replay_bench(AdaptiveBench(**{**s.__dict__, "bound": normal_interval}))
        for row, r in zip(result["rows"], ref["rows"]):
            row["normal_reference_saving"] = r["saving"]
        print("normal-approximation reference (no guarantee): "
              + ", ".join(f"{r['saving']:.2f}x at {r['images']}" for r in ref["rows"]))
    result["bound"] = bound
    return result


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
    p.add_argument("--top-k", type=lambda s: float(s) if "." in s else int(s), help="default: the run's top_k")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--scales", default="1,4,16", help="bootstrap resamples of D at these multiples of its size")
    p.add_argument("--resamples", type=int, default=3, help="replays per scale")
    p.add_argument("--order", default="none", choices=["none", "screen"], help="screen: lead with RUN/screen.parquet")
    p.add_argument("--bound", default="betting", choices=["betting", "hoeffding_serfling"])
    p.add_argument("--no-reference", action="store_true", help="skip the normal-approximation reference")
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
    result = bench(url, args.top_k, args.delta, [int(s) for s in args.scales.split(",") if s], args.resamples,
                   args.order, args.bound, not args.no_reference)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
