"""Fidelity of the gradient pre-screen against a finished exhaustive scan, and what it costs.

    python benchmarks/bench_screen.py RUN [--top-k 16] [--batch 32] [--json FILE]

Rebuilds RUN's model, D and masks from its run.json, computes every head's first-order estimate
of each score (engine.screen: one forward and one backward per view and image), and compares the
per-head estimates with the exact scores from RUN's deltas: Spearman's rho, and the share of the
exact top K in the screen's top K, 2K and 4K (method.fidelity), with the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cigma_ray.config import resolve_k
from cigma_ray.engine.screen import screen_images
from cigma_ray.method.fidelity import fidelity, screen_terms

sys.path.insert(0, str(Path(__file__).parent))
from bench_adaptive import run_matrices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--top-k", type=lambda s: float(s) if "." in s else int(s))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from cigma_ray.prune import open_scanned, scan_eval_set
    from cigma_ray.storage import RunDir

    data = run_matrices(args.run)
    cfg = data["cfg"]
    pipeline = open_scanned(RunDir(args.run))
    d = scan_eval_set(pipeline)
    adapter = pipeline.adapter
    k = resolve_k(args.top_k if args.top_k is not None else cfg.top_k, len(adapter.heads))
    start = time.perf_counter()
    got = screen_images(adapter, d.mask_images, d.fg, tau=cfg.tau, measure_fig=cfg.measure_fig, batch_size=args.batch)
    seconds = time.perf_counter() - start
    terms = screen_terms(got.grad_big.numpy(), None if got.grad_fig is None else got.grad_fig.numpy(),
                         got.big.numpy(), None if got.fig is None else got.fig.numpy())
    views = 3 if cfg.measure_fig else 2
    print(f"run       {args.run}: {data['model']}, {len(adapter.heads)} heads, D = {len(d.mask_images)} images")
    print(f"screen    {seconds:.1f} s for {len(d.mask_images) * views:,} forwards and backwards (the exhaustive scan: "
          f"{len(adapter.heads) * len(d.mask_images) * views:,} ablated forwards); "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'score':>14} {'K':>3} {'spearman':>9} {'recall@K':>9} {'@2K':>6} {'@4K':>6}")
    rows = {}
    for name, matrix in data["matrices"].items():
        f = fidelity(terms[name].mean(axis=1), matrix.mean(axis=1), k)
        rows[name] = f
        print(f"{name:>14} {k:>3} {f['spearman']:>9.3f} {f['recall_k']:>9.2f} {f['recall_2k']:>6.2f} {f['recall_4k']:>6.2f}")
    gap = np.abs(got.big.numpy() - data["big"]).max()
    print(f"intact BIG of the screen's forward vs the mask stage's: max difference {gap:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "k": k, "seconds": seconds, "fidelity": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
