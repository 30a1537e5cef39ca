"""Pruning experiments: a set of heads removed together, measured on an eval set (accuracy, NLL, ECE,
BIR, with paired bootstrap intervals), for the top K by each score and the controls that remove as
many heads: K random heads (several draws) and the K lowest-scored. A drop that random heads cause
too says little about the ranking."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import Config
from ..engine import Replica
from ..method import bir, bir_statistics, bootstrap, conflict_statistics, prediction_statistics, probs, swapped
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


def conflict_correct(replica: Replica, data: EvalSet, keep: dict, tau: float) -> np.ndarray:
    """(mask images, donors) booleans: each masked image's foreground over each of its donors, classified as
    the image's own label (the swapped images of counterfactual conflict accuracy)."""
    n, d = data.donors.shape
    images = data.mask_images.repeat_interleave(d, dim=0)
    fg = data.fg.repeat_interleave(d, dim=0)
    pred = probs(replica.logits(swapped(images, fg, data.mask_images[data.donors.reshape(-1)]), keep), tau).argmax(1)
    return (pred.numpy() == np.repeat(data.mask_labels, d)).reshape(n, d)


def evaluate(replica: Replica, data: EvalSet, removed: list[tuple[int, int]], cfg: Config,
             intervals: bool = False, per_image: dict | None = None) -> dict:
    """Metrics of the model with `removed` heads ablated together (intact when empty).

    Counterfactual conflict accuracy (`conflict_accuracy`): accuracy on the mask images' foregrounds over
    donors of another label, against their own labels (NaN where the set has no such donors). With
    `intervals`, each metric gets `_low`/`_high`: a bootstrap over the eval images (accuracy, NLL, ECE) or
    the mask images (BIR, conflict accuracy), `cfg.bootstrap` resamples seeded by `cfg.seed`, the same for
    every set of removed heads. `per_image`, when given, receives the per-image values (`correct`, `bir`,
    `conflict`) that paired comparisons between prunings need.
    """
    keep = replica.keep_without(removed)
    p = probs(replica.logits(data.images, keep), cfg.tau).numpy()
    fig, big = replica.gains(data.mask_images, data.fg, cfg.tau, keep)
    fig, big = fig.numpy(), big.numpy()
    resamples = cfg.bootstrap if intervals else 0
    stats = {**bootstrap(prediction_statistics(p, data.labels), len(p), resamples, cfg.ci_level, cfg.seed),
             **bootstrap(bir_statistics(fig, big), len(fig), resamples, cfg.ci_level, cfg.seed)}
    conflict = conflict_correct(replica, data, keep, cfg.tau) if data.swappable else None
    if conflict is not None:
        stats.update(bootstrap(conflict_statistics(conflict), len(conflict), resamples, cfg.ci_level, cfg.seed))
    else:
        stats["conflict_accuracy"] = (float("nan"),) * 3
    if per_image is not None:
        per_image.update(correct=(p.argmax(axis=1) == data.labels).astype(np.float64), bir=bir(fig, big),
                         conflict=None if conflict is None else conflict.mean(axis=1))
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


def experiment_rows(replica: Replica, data: EvalSet, plan: list[tuple], cfg: Config, bar,
                    per_image: list[dict] | None = None) -> list[dict]:
    """One row per (control, seed, heads) of the plan on one eval set, with every metric and its interval
    (and, into `per_image`, one dict of per-image values per row); `bar` (progress.ProgressLines) gets a line
    per configuration."""
    rows = []
    for control, seed, removed in plan:
        values: dict = {}
        row = evaluate(replica, data, removed, cfg, intervals=True, per_image=values)
        if per_image is not None:
            per_image.append(values)
        metrics = {key: value for key, value in row.items() if key not in ("set", "k")}
        rows.append({"set": data.name, "url": data.url, "control": control, "seed": seed, "k": len(removed),
                     "heads": " ".join(f"{l}.{h}" for l, h in removed), **metrics,
                     "n_images": len(data.labels), "n_unreadable": len(data.skipped), "n_mask_images": len(data.fg),
                     "n_swaps": int(data.donors.size) if data.swappable else 0,
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
