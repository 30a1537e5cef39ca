"""`cigma-ray demo`: the whole method on the built-in planted-shortcut benchmark.

The shipped ViT was trained where 95% of backgrounds match the class (cigma_ray/demo/train.py),
so it leans on the background. The demo scans it on a held-out split of that distribution,
ranks the heads by each score, then removes the top K together for growing K and compares
accuracy and BIR on the `aligned` and `conflicting` test splits with the intact model and with
K random heads (the trade-off curves, eval/sweep.png), and lets `prune --auto-k` choose the score
and K on the scan split's images outside D.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import Config
from ..data import open_source
from ..data.demo import ensure_demo_data
from ..evaluation import auto_k, default_k_grid, eval_set, heldout_set, sweep
from ..models import ModelSpec
from ..pipeline import Job, Pipeline
from ..reports.pruning import auto_k_text, trade_off_table, write_sweep_figure
from ..reports.run import top_heads_text
from ..rundir import open_run
from .train import DEMO_MODEL_KWARGS, DEMO_MODEL_NAME

ASSETS = Path(__file__).parents[1] / "assets"
MASK_IMAGES = 256  # held-out images masked for --auto-k's BIR and conflict accuracy (prune --auto-k's default)
DEMO_CONFIG = Config(top_k=3, unit_images=32)
EVAL_SPLITS = ("aligned", "conflicting")
EVAL_MASK_IMAGES = 32  # images per test split whose masks are learned for BIR
SWEEP_KS = (0, 1, 2, 4, 8)
RANDOM_SEEDS = 5


def demo_job(out: str, data_root: Path) -> Job:
    spec = ModelSpec(name=f"timm:{DEMO_MODEL_NAME}", checkpoint=str(ASSETS / "demo_vit.pth"),
                     model_kwargs={**DEMO_MODEL_KWARGS, "pretrained_cfg_overlay": {"crop_pct": 1.0}})
    return Job(model=spec, data=str(data_root / "scan"), out=out, config=DEMO_CONFIG)


def run_demo(out: str, progress: bool = True) -> dict:
    data_root = Path(out) / "demo_data"
    paths = ensure_demo_data(data_root)
    pipeline = Pipeline(demo_job(out, data_root), progress=progress)
    pipeline.run_all()
    run = open_run(out)
    print(top_heads_text(run))

    scanned = run.reopen()
    sets = []
    for split in EVAL_SPLITS:
        data = eval_set(scanned, open_source(str(paths[split])), EVAL_MASK_IMAGES, split, progress=progress)
        if data.skipped:
            raise RuntimeError(f"demo data under {paths[split]} is damaged ({data.skipped[0]}); delete it and run the "
                               "demo again")
        sets.append(data)
    seeds = [scanned.cfg.seed + i for i in range(RANDOM_SEEDS)]
    rows = sweep(scanned, sets, list(SWEEP_KS), seeds, run.scores, progress)
    write_sweep_figure(run.dir, rows, scanned.cfg.ci_level)
    print(f"\ntrade-off: removing the top K heads by each score, and K random heads, on the test splits "
          f"(swap acc: counterfactual conflict accuracy and BIR: over {EVAL_MASK_IMAGES} masked images per split; "
          "collapsed: accuracy at chance, FIG and BIG near zero):")
    print(trade_off_table(rows, EVAL_SPLITS, RANDOM_SEEDS))

    print("\nchoosing a score and K automatically (prune --auto-k) on the scan split's images outside D:")
    heldout = heldout_set(scanned, None, MASK_IMAGES, progress, swaps=scanned.cfg.objective == "conflict")
    result = auto_k(scanned, heldout, default_k_grid(len(scanned.heads)), seeds, run.scores,
                    scanned.cfg.max_clean_drop, progress, scanned.cfg.objective)
    print(auto_k_text(result, heldout, scanned.cfg))
    choice = result.choice
    print(f"\nresults in {os.path.abspath(out)} (eval/sweep.png: the trade-off curves; `cigma-ray report "
          f"{out}` makes the HTML page)")
    return {"sweep": rows, "auto_k": choice}
