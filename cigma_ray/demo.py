"""`cigma-ray demo`: the whole method on the built-in planted-shortcut benchmark.

The shipped ViT was trained where 95% of backgrounds match the class (cigma_ray/demo_train.py),
so it leans on the background. The demo scans it on a held-out split of that distribution,
ranks the heads by each score, then removes the top K together for growing K and compares
accuracy and BIR on the `aligned` and `conflicting` test splits with the intact model and with
K random heads (the trade-off curves, eval/sweep.png), and lets `prune --auto-k` choose the score
and K on the scan split's images outside D.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import Config
from .data import open_source
from .data.demo import ensure_demo_data
from .demo_train import DEMO_MODEL_KWARGS, DEMO_MODEL_NAME
from .method import SCORES
from .models import ModelSpec
from .pipeline import Job, Pipeline
from .prune import MASK_IMAGES, auto_k, default_k_grid, eval_set, heldout_set, sweep
from .report import format_table, print_top

ASSETS = Path(__file__).parent / "assets"
DEMO_CONFIG = Config(top_k=3, unit_images=32)
EVAL_SPLITS = ("aligned", "conflicting")
EVAL_MASK_IMAGES = 32  # images per test split whose masks are learned for BIR
SWEEP_KS = (0, 1, 2, 4, 8)
RANDOM_SEEDS = 5


def demo_job(out: str, data_root: Path) -> Job:
    spec = ModelSpec(name=f"timm:{DEMO_MODEL_NAME}", checkpoint=str(ASSETS / "demo_vit.pth"),
                     model_kwargs={**DEMO_MODEL_KWARGS, "pretrained_cfg_overlay": {"crop_pct": 1.0}})
    return Job(model=spec, data=str(data_root / "scan"), out=out, config=DEMO_CONFIG)


def trade_off_table(rows: list[dict]) -> str:
    """One line per (K, heads removed): accuracy and mean BIR on each split; random heads as the mean of the draws."""
    table = []
    for k in sorted({r["k"] for r in rows}):
        for control in ("intact", *SCORES, "random"):
            cells = []
            for split in EVAL_SPLITS:
                group = [r for r in rows if r["set"] == split and r["k"] == k and r["control"] == control]
                if not group:
                    break
                cells += [f"{np.mean([r['accuracy'] for r in group]):.3f}", f"{np.mean([r['bir_mean'] for r in group]):.3f}"]
            if len(cells) < 2 * len(EVAL_SPLITS):
                continue
            gone = [r for r in rows if r["k"] == k and r["control"] == control and r["collapsed"]]
            label = "none" if control == "intact" else (f"{k} random (mean of {RANDOM_SEEDS})" if control == "random"
                                                        else f"top {k} by {control}")
            heads = next(r["heads"] for r in rows if r["k"] == k and r["control"] == control) if control in SCORES else ""
            if gone:
                label += f" (collapsed{f' in {len(gone)} draws' if control == 'random' else ''})"
            table.append([label, heads, *cells])
    header = ["heads removed", "heads"] + [f"{split} {m}" for split in EVAL_SPLITS for m in ("acc", "BIR")]
    return format_table(header, table, "llrrrr")


def run_demo(out: str, progress: bool = True) -> dict:
    data_root = Path(out) / "demo_data"
    paths = ensure_demo_data(data_root)
    pipeline = Pipeline(demo_job(out, data_root), progress=progress)
    pipeline.run_all()
    print_top(pipeline.run)

    sets = []
    for split in EVAL_SPLITS:
        data = eval_set(pipeline, open_source(str(paths[split])), EVAL_MASK_IMAGES, split)
        if data.skipped:
            raise RuntimeError(f"demo data under {paths[split]} is damaged ({data.skipped[0]}); delete it and run the "
                               "demo again")
        sets.append(data)
    seeds = [pipeline.cfg.seed + i for i in range(RANDOM_SEEDS)]
    rows = sweep(pipeline, sets, list(SWEEP_KS), seeds, list(SCORES), progress)
    print(f"\ntrade-off: removing the top K heads by each score, and K random heads, on the test splits "
          f"(BIR: mean over {EVAL_MASK_IMAGES} images per split; collapsed: accuracy at chance, FIG and BIG near zero):")
    print(trade_off_table(rows))

    print("\nchoosing a score and K automatically (prune --auto-k) on the scan split's images outside D:")
    heldout = heldout_set(pipeline, None, MASK_IMAGES)
    choice = auto_k(pipeline, heldout, default_k_grid(len(pipeline.adapter.heads)), seeds, list(SCORES),
                    pipeline.cfg.max_clean_drop, progress)
    print(f"\nresults in {os.path.abspath(out)} (eval/sweep.png: the trade-off curves; `cigma-ray report "
          f"{out}` makes the HTML page)")
    return {"sweep": rows, "auto_k": choice}
