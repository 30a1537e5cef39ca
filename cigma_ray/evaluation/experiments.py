"""Pruning experiments: a set of heads removed together, measured on an eval set (accuracy, NLL, ECE,
BIR, with paired bootstrap intervals), for the top K by each score and the controls that remove as
many heads: K random heads (several draws) and the K lowest-scored. A drop that random heads cause
too says little about the ranking."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import Config
from ..engine import Replica
from ..method import bir_statistics, bootstrap, prediction_statistics, probs
from ..progress import ProgressLines
from ..rundir import Run, Scanned
from .evalsets import EvalSet

# A pruned model has collapsed when its accuracy is within COLLAPSE_MARGIN of chance and removing the
# foreground or the background barely moves its prediction (mean FIG and BIG below COLLAPSE_GAIN nats).
COLLAPSE_MARGIN = 0.05
COLLAPSE_GAIN = 1e-3


def random_heads(heads: list[tuple[int, int]], k: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [heads[i] for i in sorted(rng.choice(len(heads), size=k, replace=False))]


def evaluate(replica: Replica, data: EvalSet, removed: list[tuple[int, int]], cfg: Config,
             intervals: bool = False) -> dict:
    """Metrics of the model with `removed` heads ablated together (intact when empty).

    With `intervals`, each metric gets `_low`/`_high`: a bootstrap over the eval images (accuracy, NLL,
    ECE) or the mask images (BIR), `cfg.bootstrap` resamples seeded by `cfg.seed`, the same for
    every set of removed heads.
    """
    keep = replica.keep_without(removed)
    p = probs(replica.logits(data.images, keep), cfg.tau).numpy()
    fig, big = replica.gains(data.mask_images, data.fg, cfg.tau, keep)
    fig, big = fig.numpy(), big.numpy()
    resamples = cfg.bootstrap if intervals else 0
    stats = {**bootstrap(prediction_statistics(p, data.labels), len(p), resamples, cfg.ci_level, cfg.seed),
             **bootstrap(bir_statistics(fig, big), len(fig), resamples, cfg.ci_level, cfg.seed)}
    row = {"set": data.name, "k": len(removed)}
    for name, (point, low, high) in stats.items():
        row[name] = point
        if intervals:
            row[f"{name}_low"], row[f"{name}_high"] = low, high
    return {**row, "fig": float(fig.mean()), "big": float(big.mean())}


def collapsed(row: dict, chance: float) -> bool:
    return row["accuracy"] <= chance + COLLAPSE_MARGIN and row["fig"] < COLLAPSE_GAIN and row["big"] < COLLAPSE_GAIN


def control_heads(run: Run, heads: list[tuple[int, int]], k: int, seeds: list[int],
                  scores: list[str]) -> list[tuple]:
    """(control, seed, heads) of the top K by each score and the controls: K random heads per seed, and
    the K lowest by the run's score."""
    return ([(score, None, run.top_heads(k, score)) for score in scores]
            + [("random", s, random_heads(heads, k, s)) for s in seeds]
            + [("lowest", None, run.top_heads(k, lowest=True))])


def describe(control: str, seed: int | None, k: int, cfg: Config) -> str:
    """A configuration in words: the intact model, the top K by a score, K random heads, the K lowest."""
    if control == "intact":
        return "the intact model"
    if control == "random":
        return f"{k} random heads (seed {seed})"
    if control == "lowest":
        return f"the {k} lowest by {cfg.score}"
    return f"the top {k} by {control}"


def experiment_rows(replica: Replica, data: EvalSet, plan: list[tuple], cfg: Config, bar) -> list[dict]:
    """One row per (control, seed, heads) of the plan on one eval set, with every metric and its interval;
    `bar` (progress.ProgressLines) gets a line per configuration."""
    rows = []
    for control, seed, removed in plan:
        row = evaluate(replica, data, removed, cfg, intervals=True)
        metrics = {key: value for key, value in row.items() if key not in ("set", "k")}
        rows.append({"set": data.name, "url": data.url, "control": control, "seed": seed, "k": len(removed),
                     "heads": " ".join(f"{l}.{h}" for l, h in removed), **metrics,
                     "n_images": len(data.labels), "n_unreadable": len(data.skipped), "n_mask_images": len(data.fg),
                     "bir_in_sample": data.in_sample, "chance": data.chance, "collapsed": collapsed(row, data.chance)})
        bar.update(1, f"{describe(control, seed, len(removed), cfg)} on {data.name}: accuracy {row['accuracy']:.3f}, "
                      f"BIR {row['bir_mean']:.3f}")
    return rows


def run_experiments(scanned: Scanned, sets: list[EvalSet], ks: list[int], seeds: list[int], scores: list[str],
                    progress: bool) -> list[dict]:
    """The intact model and, for each K > 0, the top K by each score and the controls, on every eval set."""
    plan = [("intact", None, [])] + [c for k in ks if k > 0
                                     for c in control_heads(scanned.run, scanned.heads, k, seeds, scores)]
    with ProgressLines("prune", len(plan) * len(sets), progress) as bar:
        return [row for data in sets for row in experiment_rows(scanned.replica, data, plan, scanned.cfg, bar)]


def sweep(scanned: Scanned, sets: list[EvalSet], ks: list[int], seeds: list[int], scores: list[str],
          progress: bool) -> list[dict]:
    """run_experiments for several K, saved as eval/sweep.parquet."""
    rows = run_experiments(scanned, sets, ks, seeds, scores, progress)
    scanned.dir.write_table("eval/sweep.parquet", pa.Table.from_pylist(rows))
    return rows


def prune(scanned: Scanned, sets: list[EvalSet], k: int, seeds: list[int], scores: list[str], progress: bool) -> list[dict]:
    """run_experiments for one K, saved as eval/prune-kK.parquet."""
    rows = run_experiments(scanned, sets, [k], seeds, scores, progress)
    scanned.dir.write_table(f"eval/prune-k{k}.parquet", pa.Table.from_pylist(rows))
    return rows
