"""`cigma-ray demo`: the whole method on a built-in planted-shortcut benchmark.

Two benchmarks (`--benchmark`): `shapes` (data/demo.py: flat shapes on flat colours, a ViT trained from
scratch where 95% of backgrounds match the class: demo/train.py) and `scenes` (data/scenes.py:
articulated, patterned objects in procedural scenes, a ViT pretrained on another generated task and
fine-tuned where 90% match: demo/scenes_train.py). The demo scans the shipped model on a held-out split
of its training distribution, ranks the heads by each score, then removes the top K together for growing
K and compares accuracy, counterfactual conflict accuracy and BIR on the `aligned` and `conflicting` test
splits with the intact model and with K random heads (the trade-off curves, eval/sweep.png), and lets
`prune --auto-k` choose the score and K on the scan split's images outside D.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Config, ConfigError
from ..data import open_source
from ..evaluation import auto_k, default_k_grid, eval_set, heldout_set, sweep
from ..models import ModelSpec
from ..pipeline import Job, Pipeline
from ..reports.pruning import auto_k_text, trade_off_table, write_sweep_figure
from ..reports.run import top_heads_text
from ..rundir import open_run
from .scenes_train import SCENES_MODEL_KWARGS, SCENES_MODEL_NAME
from .train import DEMO_MODEL_KWARGS, DEMO_MODEL_NAME

ASSETS = Path(__file__).parents[1] / "assets"
MASK_IMAGES = 256  # held-out images masked for --auto-k's BIR and conflict accuracy (prune --auto-k's default)
DEMO_CONFIG = Config(top_k=3, unit_images=32)
EVAL_SPLITS = ("aligned", "conflicting")
EVAL_MASK_IMAGES = 32  # images per test split whose masks are learned for BIR
SWEEP_KS = (0, 1, 2, 4, 8)
RANDOM_SEEDS = 5


def _shapes_data(root: Path, reduced: bool) -> dict[str, Path]:
    from ..data.demo import ensure_demo_data

    if reduced:
        raise ConfigError("--reduced: the shapes benchmark has one size (it is small already); --reduced is for "
                          "--benchmark scenes")
    return ensure_demo_data(root)


def _scenes_data(root: Path, reduced: bool) -> dict[str, Path]:
    from ..data.scenes import ensure_scenes_data

    return ensure_scenes_data(root, reduced=reduced)


@dataclass(frozen=True)
class Benchmark:
    """A built-in benchmark: its shipped timm model (assets/CHECKPOINT), its data generator and scan config."""

    model_name: str
    model_kwargs: dict
    checkpoint: str
    ensure_data: Callable[[Path, bool], dict[str, Path]]  # (root, reduced) -> {split: folder}
    data_folder: str  # under the run directory
    config: Config = DEMO_CONFIG

    def spec(self) -> ModelSpec:
        # crop_pct 1.0: the tool sees the 64 px images uncropped, as the model was trained
        return ModelSpec(name=f"timm:{self.model_name}", checkpoint=str(ASSETS / self.checkpoint),
                         model_kwargs={**self.model_kwargs, "pretrained_cfg_overlay": {"crop_pct": 1.0}})


BENCHMARKS = {"shapes": Benchmark(DEMO_MODEL_NAME, DEMO_MODEL_KWARGS, "demo_vit.pth", _shapes_data, "demo_data"),
              "scenes": Benchmark(SCENES_MODEL_NAME, SCENES_MODEL_KWARGS, "scenes_vit.pth", _scenes_data,
                                  "scenes_data")}


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"--benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def demo_job(out: str, data_root: Path, name: str = "shapes") -> Job:
    """The demo's scan of one benchmark: its shipped model on the scan split under `data_root`."""
    bench = benchmark(name)
    return Job(model=bench.spec(), data=str(data_root / "scan"), out=out, config=bench.config)


def run_demo(out: str, progress: bool = True, name: str = "shapes", reduced: bool = False) -> dict:
    """The whole method on benchmark `name` (`reduced`: its small form, scenes only), into run directory `out`."""
    bench = benchmark(name)
    data_root = Path(out) / bench.data_folder
    paths = bench.ensure_data(data_root, reduced)
    pipeline = Pipeline(demo_job(out, data_root, name), progress=progress)
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
