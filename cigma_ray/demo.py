"""`cigma-ray demo`: the whole method on the built-in planted-shortcut benchmark.

The shipped ViT was trained where 95% of backgrounds match the class (cigma_ray/demo_train.py),
so it leans on the background. The demo scans it on a held-out split of that distribution,
ranks the heads, then removes the top K together and compares accuracy and BIR on the
`aligned` and `conflicting` test splits with the intact model and with K random heads.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import Config
from .data import open_source
from .data.demo import ensure_demo_data
from .demo_train import DEMO_MODEL_KWARGS, DEMO_MODEL_NAME
from .models import ModelSpec
from .pipeline import Job, Pipeline
from .prune import eval_set, evaluate, random_heads, top_heads
from .report import format_table, print_top

ASSETS = Path(__file__).parent / "assets"
DEMO_CONFIG = Config(top_k=3, unit_images=32)
EVAL_SPLITS = ("aligned", "conflicting")
EVAL_MASK_IMAGES = 32  # images per test split whose masks are learned for BIR
RANDOM_SEEDS = 5


def demo_job(out: str, data_root: Path) -> Job:
    spec = ModelSpec(name=f"timm:{DEMO_MODEL_NAME}", checkpoint=str(ASSETS / "demo_vit.pth"),
                     model_kwargs={**DEMO_MODEL_KWARGS, "pretrained_cfg_overlay": {"crop_pct": 1.0}})
    return Job(model=spec, data=str(data_root / "scan"), out=out, config=DEMO_CONFIG)


def run_demo(out: str, progress: bool = True) -> list[dict]:
    data_root = Path(out) / "demo_data"
    paths = ensure_demo_data(data_root)
    pipeline = Pipeline(demo_job(out, data_root), progress=progress)
    pipeline.run_all()
    print_top(pipeline.run)

    k = pipeline.cfg.top_k
    rankings = pipeline.run.read_table("rankings.parquet")
    heads = pipeline.adapter.heads
    replica = pipeline.worker.replica
    rows = []
    for split in EVAL_SPLITS:
        data = eval_set(pipeline, open_source(str(paths[split])), EVAL_MASK_IMAGES, split)
        if data.skipped:
            raise RuntimeError(f"demo data under {paths[split]} is damaged ({data.skipped[0]}); delete it and run the "
                               "demo again")
        rows.append({"removed": "none", **evaluate(replica, data, [], pipeline.cfg)})
        chosen = top_heads(rankings, k)
        rows.append({"removed": f"CIGMA top {k}: " + " ".join(f"{l}.{h}" for l, h in chosen),
                     **evaluate(replica, data, chosen, pipeline.cfg)})
        rand = [evaluate(replica, data, random_heads(heads, k, seed), pipeline.cfg) for seed in range(RANDOM_SEEDS)]
        rows.append({"removed": f"{k} random heads (mean of {RANDOM_SEEDS} draws)",
                     **{key: float(np.mean([r[key] for r in rand])) if isinstance(rand[0][key], float) else rand[0][key]
                        for key in rand[0]}})
    pipeline.run.write_table(f"eval/demo-k{k}.parquet", pa.Table.from_pylist(rows))
    print(f"\npruning the top {k} heads, on the test splits (BIR from {EVAL_MASK_IMAGES} images per split):")
    print(format_table(["split", "heads removed", "accuracy", "BIR (mean)", "BIR (ratio)", "NLL", "ECE"],
                       [[r["set"], r["removed"], f"{r['accuracy']:.3f}", f"{r['bir_mean']:.3f}", f"{r['bir_ratio']:.3f}",
                         f"{r['nll']:.3f}", f"{r['ece']:.3f}"] for r in rows], "llrrrrr"))
    print(f"\nresults in {os.path.abspath(out)}")
    return rows
