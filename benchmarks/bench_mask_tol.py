"""Fidelity and saving of the masks' early stop (config key mask_tol) against the method's full 250 steps.

    python benchmarks/bench_mask_tol.py [--images 64] [--batch 32] [--steps 250] [--tols 1e-3,3e-4,1e-4]
                                        [--window 10] [--top-k 3] [--data DIR] [--json FILE]

On the shipped demo model and the demo's scan split (generated if --data is not given), the first
`images` correctly classified images get their masks twice per tolerance, in batches of `batch`
(a run's mask_batch): with every mask taking all `steps` steps, and with mask_tol. It prints, per
tolerance: the share of images whose foreground S (the kept cells) is identical, the mean IoU of S,
the change in FIG and BIG (mean absolute and mean signed), the top-K heads by big_drop from a scan
with each set of masks (the overlap of the sets, Spearman's rho of the scores), and the steps saved:
per image (mean steps taken) and per batch (a batch runs until its last image stops, which is what
the wall clock sees), with the wall time.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cigma_ray.data import open_source
from cigma_ray.data.demo import ensure_demo_data
from cigma_ray.demo.run import demo_job
from cigma_ray.engine import scan_heads
from cigma_ray.method import counterfactuals, foreground_cells, gains, optimise_masks, probs
from cigma_ray.method.fidelity import top
from cigma_ray.method.stability import spearman
from cigma_ray.models import load


def correct_images(adapter, source, transform, n: int) -> torch.Tensor:
    """The first n images of the source (in its order) that the model classifies correctly."""
    chosen = []
    for start in range(0, len(source.records), 64):
        records = source.records[start: start + 64]
        images, ok, _ = source.load(records, transform)
        with torch.no_grad():
            pred = adapter.logits(images).argmax(1)
        labels = torch.tensor([r.label for r in ok])
        chosen += [images[i] for i in torch.nonzero(pred == labels).flatten().tolist()]
        if len(chosen) >= n:
            break
    return torch.stack(chosen[:n])


def masks_of(adapter, images: torch.Tensor, batch: int, steps: int, tol: float, window: int):
    """(fg cells, FIG, BIG, steps per image, steps per batch, seconds) for masks learned batch by batch."""
    fgs, figs, bigs, took, batch_steps = [], [], [], [], []
    start = time.perf_counter()
    for s in range(0, len(images), batch):
        x = images[s: s + batch]
        with torch.no_grad():
            q = probs(adapter.logits(x))
        mask, used = optimise_masks(adapter.logits, x, q, mask_steps=steps, mask_tol=tol, mask_window=window,
                                    return_steps=True)
        fg = foreground_cells(mask, 0.35)
        no_bg, no_fg = counterfactuals(x, fg)
        with torch.no_grad():
            fig, big, _ = gains(q, probs(adapter.logits(no_fg)), probs(adapter.logits(no_bg)))
        fgs.append(fg)
        figs.append(fig)
        bigs.append(big)
        took.append(used)
        batch_steps.append(int(used.max()))
    return (torch.cat(fgs), torch.cat(figs).numpy(), torch.cat(bigs).numpy(), torch.cat(took).numpy(), batch_steps,
            time.perf_counter() - start)


def head_scores(adapter, images: torch.Tensor, fg: torch.Tensor, big: np.ndarray) -> np.ndarray:
    no_bg, _ = counterfactuals(images, fg)
    ablated = scan_heads(adapter, images, no_bg, adapter.heads, batch_size=64).big.numpy()
    return (big[None, :] - ablated).mean(axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="images whose masks are learned together (mask_batch)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--tols", default="1e-3,3e-4,1e-4")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--data", help="an ImageFolder of demo-like images (default: the demo's scan split, generated)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = args.data or str(ensure_demo_data(Path(tempfile.gettempdir()) / "cigma-demo-data", ("scan",))["scan"])
    lm = load(demo_job("unused", Path(data).parent).model)
    adapter = lm.adapter
    images = correct_images(adapter, open_source(data), lm.transform, args.images)
    n = len(images)
    full_fg, full_fig, full_big, _, full_batch_steps, full_s = masks_of(adapter, images, args.batch, args.steps, 0.0,
                                                                        args.window)
    full_scores = head_scores(adapter, images, full_fg, full_big)
    full_top = set(top(full_scores, args.top_k).tolist())
    print(f"model     the demo ViT (6 x 4 heads), {n} correctly classified images of {data}, masks in batches of "
          f"{args.batch}, {args.steps} steps: {full_s:.1f} s; {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'mask_tol':>9} {'window':>6} {'S same':>7} {'IoU S':>6} {'|dFIG|':>8} {'dFIG':>9} {'|dBIG|':>8} {'dBIG':>9} "
          f"{'top-K':>6} {'rho':>5} {'img steps':>10} {'batch steps':>12} {'seconds':>8}")
    rows = []
    for tol in [float(t) for t in args.tols.split(",") if t]:
        fg, fig, big, took, batch_steps, secs = masks_of(adapter, images, args.batch, args.steps, tol, args.window)
        same = (fg == full_fg).flatten(1).all(1).float().mean().item()
        inter = (fg & full_fg).flatten(1).sum(1).float()
        union = (fg | full_fg).flatten(1).sum(1).float()
        iou = (inter / union).mean().item()
        scores = head_scores(adapter, images, fg, big)
        overlap = len(full_top & set(top(scores, args.top_k).tolist())) / args.top_k
        row = {"mask_tol": tol, "window": args.window, "s_identical": same, "iou": iou,
               "fig_abs": float(np.abs(fig - full_fig).mean()), "fig_signed": float((fig - full_fig).mean()),
               "big_abs": float(np.abs(big - full_big).mean()), "big_signed": float((big - full_big).mean()),
               "top_k_overlap": overlap, "spearman": spearman(scores, full_scores),
               "image_steps_mean": float(took.mean()), "batch_steps": batch_steps, "seconds": secs,
               "full_seconds": full_s}
        rows.append(row)
        print(f"{tol:>9.0e} {args.window:>6} {same:>7.2f} {iou:>6.3f} {row['fig_abs']:>8.5f} {row['fig_signed']:>+9.5f} "
              f"{row['big_abs']:>8.5f} {row['big_signed']:>+9.5f} {overlap:>6.2f} {row['spearman']:>5.2f} "
              f"{took.mean():>10.1f} {'/'.join(map(str, batch_steps)):>12} {secs:>8.1f}")
    print(f"full run: {args.steps} steps per image and per batch; mean FIG {full_fig.mean():.4f}, mean BIG "
          f"{full_big.mean():.4f}; top {args.top_k} heads by big_drop: {sorted(full_top)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "batch": args.batch, "steps": args.steps, "rows": rows,
                                               "machine": platform.processor() or platform.machine()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
