"""Ablate a set of heads together and measure what changes: accuracy, BIR, NLL, ECE, with bootstrap intervals.

`cigma-ray prune RUN --k K` removes a run's top-K heads by each score the run has (the paper's
big_drop, and bir_drop and big_minus_fig when the scan measured FIG^(-h)) and compares the model
with the intact one and with two controls that remove as many heads: K random heads (several
draws) and the K lowest-scored heads. A drop that random heads cause too says little about the
ranking. `cigma-ray sweep RUN --k 0,4,8` does the same for several K and plots it.
`cigma-ray prune RUN --auto-k` picks the score and K on held-out images, under a guard on clean accuracy.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import posixpath
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from .config import Config, ConfigError, from_dict, resolve_k
from .data import DataError, ImageSource, open_source
from .engine import Replica
from .method import SCORES, bootstrap, weighted_ece
from .method.metrics import EPS
from .models import ModelError
from .pipeline import Job, Pipeline, RunMismatch, progress_bar, scanned_model_spec, select_images
from .report import format_table
from .storage import RunDir, StorageError

COLUMNS = {"accuracy": "accuracy", "bir_mean": "BIR (mean)", "bir_ratio": "BIR (ratio)", "nll": "NLL", "ece": "ECE"}
MASK_IMAGES = 64  # default images per eval set whose masks are learned for BIR
RANDOM_SEEDS = 5
# A pruned model has collapsed when its accuracy is within COLLAPSE_MARGIN of chance and removing the
# foreground or the background barely moves its prediction (mean FIG and BIG below COLLAPSE_GAIN nats).
COLLAPSE_MARGIN = 0.05
COLLAPSE_GAIN = 1e-3
CONTROL_NAMES = {"intact": "none", **{name: "top {k} by " + name for name in SCORES}, "random": "{k} random",
                 "lowest": "{k} lowest-scored"}
CONTROLS = tuple(CONTROL_NAMES)  # table order


@dataclass
class EvalSet:
    """Images with labels, plus a subset with foreground cells (learned on the intact model) for BIR."""

    name: str
    images: torch.Tensor
    labels: np.ndarray
    mask_images: torch.Tensor
    fg: torch.Tensor
    url: str = ""
    in_sample: bool = False  # the scan's own data: BIR on D, the very images the heads were ranked on
    skipped: list[str] = field(default_factory=list)  # unreadable images, "path: error"

    @property
    def chance(self) -> float:
        return 1 / len(np.unique(self.labels))


def top_heads(rankings: pa.Table, k: int, lowest: bool = False, score: str | None = None) -> list[tuple[int, int]]:
    """The k best-ranked heads (or the k worst, as a control), by the run's score or by `score`."""
    column = "rank" if score is None else f"{score}_rank"
    rows = rankings.sort_by([(column, "descending" if lowest else "ascending")]).slice(0, k).to_pylist()
    return [(r["layer"], r["head"]) for r in rows]


def run_scores(meta: dict) -> list[str]:
    """The scores a run can rank by: all three when its scan measured FIG^(-h), else the paper's; an
    iterative run only by the score its rounds removed heads by (other orders mix rounds)."""
    cfg = meta["config"]
    if cfg.get("rounds", 1) > 1:
        return [cfg.get("score", "big_drop")]
    return list(SCORES) if cfg.get("measure_fig", False) else ["big_drop"]


def parse_scores(text: str | None, meta: dict) -> list[str]:
    """--scores: a comma-separated subset of the run's scores (default: all of them)."""
    available = run_scores(meta)
    if text is None:
        return available
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in chosen if x not in available]
    if bad or not chosen:
        why = ("its scan did not measure FIG^(-h) (config measure_fig: false)" if len(available) == 1 and
               meta["config"].get("rounds", 1) == 1 else "that is what it has")
        raise ConfigError(f"--scores {text!r}: this run can rank by {', '.join(available)} ({why})")
    return list(dict.fromkeys(chosen))


def random_heads(heads: list[tuple[int, int]], k: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [heads[i] for i in sorted(rng.choice(len(heads), size=k, replace=False))]


def check_k(k: int, n_heads: int, name: str = "top_k", allow_zero: bool = False) -> None:
    """K heads to remove: 1 to n_heads (a sweep may also name 0, the intact model)."""
    low = 0 if allow_zero else 1
    if not low <= k <= n_heads:
        raise ConfigError(f"{name}={k}: the model has {n_heads} heads; choose K from {low} to {n_heads}")


# -- metrics ---------------------------------------------------------------------------------------

def prediction_statistics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, NLL and ECE as functions of per-image weights, for `method.bootstrap`."""
    p = np.asarray(probs, dtype=np.float64)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    loss = -np.log(np.clip(p[np.arange(len(labels)), labels], EPS, None))
    conf = p.max(axis=1)
    return {"accuracy": lambda w: w @ correct / w.sum(axis=1), "nll": lambda w: w @ loss / w.sum(axis=1),
            "ece": lambda w: weighted_ece(conf, correct, w)}


def bir_statistics(fig: np.ndarray, big: np.ndarray) -> dict:
    """Mean BIR and ratio-of-means BIR over images with FIG + BIG > 0 (as `bir_summary`), under per-image weights."""
    fig, big = np.asarray(fig, dtype=np.float64), np.asarray(big, dtype=np.float64)
    ok = ((fig + big) > 0).astype(np.float64)
    bir = np.divide(big, fig + big, out=np.zeros_like(big), where=ok > 0)

    def ratio(w, num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ num) / (w @ den)

    return {"bir_mean": lambda w: ratio(w, bir, ok), "bir_ratio": lambda w: ratio(w, big * ok, (fig + big) * ok)}


def evaluate(replica: Replica, data: EvalSet, removed: list[tuple[int, int]], cfg: Config,
             intervals: bool = False) -> dict:
    """Metrics of the model with `removed` heads ablated together (intact when empty).

    With `intervals`, each metric gets `_low`/`_high`: a bootstrap over the eval images (accuracy, NLL,
    ECE) or the mask images (BIR), `cfg.bootstrap` resamples seeded by `cfg.seed`, the same for
    every set of removed heads.
    """
    keep = replica.keep_without(removed)
    p = torch.softmax(replica.logits(data.images, keep) / cfg.tau, dim=1).numpy()
    fig, big, _ = replica.gains(data.mask_images, data.fg, cfg.tau, keep)
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


# -- the run and its eval sets ---------------------------------------------------------------------

def run_job(run: RunDir, device: str = "cpu", checkpoint: str | None = None) -> Job:
    """The Job that made a run, read back from its run.json, so its Pipeline rebuilds the scanned model and data."""
    meta = run.read_json("run.json")
    return Job(model=scanned_model_spec(meta, checkpoint), data=meta["data"]["url"], out=run.url,
               config=from_dict(meta["config"], source=f"{run.url}/run.json"), device=device,
               precision=meta["precision"])


def open_scanned(run: RunDir, device: str = "cpu", checkpoint: str | None = None) -> Pipeline:
    """The run's Pipeline, which checks that model, data and config are still the ones scanned."""
    try:
        return Pipeline(run_job(run, device, checkpoint), progress=False)
    except (DataError, ModelError, RunMismatch) as e:
        raise type(e)(f"cannot rebuild the scan of {run.url} as run.json records it: {e}") from None


def scan_eval_set(pipeline: Pipeline, name: str | None = None) -> EvalSet:
    """Every readable image of the scan's data; BIR on D with the run's own masks (in-sample)."""
    source = pipeline.source
    images, ok, failed = source.load(source.records, pipeline.loaded.transform)
    if not ok:
        raise DataError(f"{source.url}: none of its images can be read now")
    position = {r.image_id: i for i, r in enumerate(ok)}
    masks = pipeline.run.read_folder("masks", ["image_id", "fg"]).sort_by("image_id")
    masks = masks.filter(pa.array([i in position for i in masks["image_id"].to_pylist()]))
    side = pipeline.cfg.mask_size
    fg = torch.from_numpy(np.stack(masks["fg"].to_numpy(zero_copy_only=False))).reshape(-1, side, side)
    return EvalSet(name or set_name(source.url), images, np.array([r.label for r in ok]),
                   images[[position[i] for i in masks["image_id"].to_pylist()]], fg, source.url, True,
                   [f"{r.path}: {e}" for r, e in failed])


def open_eval_source(pipeline: Pipeline, url: str) -> ImageSource:
    """An eval data set whose labels mean the same model outputs as the scan's: class folders named by
    output index, or the very class names the scan had (mapped by sorted position, as there)."""
    source = open_source(url)
    outputs = pipeline.loaded.num_classes
    if all(c.isdigit() for c in source.classes):
        too_big = [c for c in source.classes if int(c) >= outputs]
        if too_big:
            raise DataError(f"--eval-data {url}: class {too_big[0]} is not an output of {pipeline.job.model.name}, "
                            f"which has {outputs} classes")
        return source
    scanned = pipeline.manifest["data"]["classes"]
    if source.classes != scanned:
        raise DataError(f"--eval-data {url} has the classes {', '.join(source.classes)}, but {pipeline.run.url} was "
                        f"scanned with {', '.join(scanned)}; named classes must be the same ones, so that each means "
                        f"the same output (or name the class folders by output index: 0 to {outputs - 1})")
    return source


def eval_set(pipeline: Pipeline, source: ImageSource, mask_images: int, name: str | None = None,
             records: list | None = None) -> EvalSet:
    """All readable images of a data set (or of `records`, a subset of it), and masks learned on the
    intact model for a seeded sample.

    The masks are cached in eval/, keyed by the data's listing, the subset and the sample size, and
    learned in groups of the run's mask_batch, so a repeated command reuses them and gets the same BIR.
    """
    images, ok, failed = source.load(source.records if records is None else records, pipeline.loaded.transform)
    if not ok:
        raise DataError(f"--eval-data {source.url}: none of its {len(source)} images can be read "
                        f"({failed[0][1] if failed else 'no images chosen'})")
    count = min(mask_images, len(ok))
    sample = select_images(range(len(ok)), count / len(ok), pipeline.cfg.seed)
    name = name or set_name(source.url)
    key = source.fingerprint()[:12]
    if records is not None:
        key += "-" + hashlib.sha256(",".join(str(r.image_id) for r in records).encode()).hexdigest()[:8]
    cache = f"eval/masks-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{key}-n{count}.parquet"
    if pipeline.run.exists(cache):
        fg = np.stack(pipeline.run.read_table(cache)["fg"].to_numpy(zero_copy_only=False))
    else:
        print(f"learning masks of {len(sample)} images of {name} on the intact model, for BIR (kept in {cache})",
              file=sys.stderr)
        batch = pipeline.cfg.mask_batch
        fg = np.concatenate([pipeline.worker.replica.masks(images[sample[i: i + batch]], pipeline.cfg).fg
                             .reshape(len(sample[i: i + batch]), -1).numpy() for i in range(0, len(sample), batch)])
        pipeline.run.write_table(cache, pa.table({"image_id": [ok[i].image_id for i in sample], "fg": list(fg)}))
    side = pipeline.cfg.mask_size
    return EvalSet(name, images, np.array([r.label for r in ok]), images[sample],
                   torch.from_numpy(fg).reshape(len(sample), side, side), source.url, False,
                   [f"{r.path}: {e}" for r, e in failed])


def heldout_set(pipeline: Pipeline, url: str | None, mask_images: int) -> EvalSet:
    """Images the intact model classifies correctly and the scores never saw: of the scan's own data,
    those outside D (the run's predictions say which are correct); of another data set (`url`), those
    it predicts correctly now. Accuracy on this set starts at 1, so its drop is the clean accuracy lost."""
    source = pipeline.source if url is None else open_eval_source(pipeline, url)
    d_ids = set(pipeline.run.read_folder("masks", ["image_id"])["image_id"].to_pylist())
    if source.fingerprint() == pipeline.manifest["data"]["fingerprint"]:
        preds = pipeline.run.read_folder("predictions", ["image_id", "correct"])
        correct = {i for i, ok in zip(preds["image_id"].to_pylist(), preds["correct"].to_pylist()) if ok}
        records = [r for r in source.records if r.image_id in correct and r.image_id not in d_ids]
    else:
        images, ok, _ = source.load(source.records, pipeline.loaded.transform)
        if not ok:
            raise DataError(f"--eval-data {source.url}: none of its {len(source)} images can be read")
        pred = pipeline.worker.replica.logits(images).argmax(dim=1).numpy()
        records = [r for r, p in zip(ok, pred) if p == r.label]
    if len(records) < 2:
        raise DataError(f"{source.url} has {len(records)} correctly classified image(s) outside D; --auto-k needs "
                        "held-out images: pass --eval-data with a data set of the same classes")
    return eval_set(pipeline, source, mask_images, f"{set_name(source.url)}-heldout", records)


def set_name(url: str) -> str:
    base = posixpath.basename(url.rstrip("/"))
    return base[: -len(".parquet")] if base.endswith(".parquet") else base or url


def eval_sets(pipeline: Pipeline, urls: list[str] | None, mask_images: int) -> list[EvalSet]:
    """The --eval-data sets (the scan's own data, with D's masks, when given none or named among them).

    Every source is opened and checked before any images are read or masks learned.
    """
    if not urls:
        return [scan_eval_set(pipeline)]
    sources = [open_eval_source(pipeline, url) for url in urls]
    scanned = pipeline.manifest["data"]["fingerprint"]
    names: list[str] = []
    for s in sources:
        base = set_name(s.url)
        names.append(base if base not in names else f"{base}-{len(names) + 1}")
    return [scan_eval_set(pipeline, name) if s.fingerprint() == scanned else eval_set(pipeline, s, mask_images, name)
            for s, name in zip(sources, names)]


# -- controls --------------------------------------------------------------------------------------

def control_heads(rankings: pa.Table, heads: list[tuple[int, int]], k: int, seeds: list[int],
                  scores: list[str]) -> list[tuple]:
    """(control, seed, heads) of the top K by each score and the controls: K random heads per seed, and
    the K lowest by the run's score."""
    return ([(score, None, top_heads(rankings, k, score=score)) for score in scores]
            + [("random", s, random_heads(heads, k, s)) for s in seeds]
            + [("lowest", None, top_heads(rankings, k, lowest=True))])


def experiment_rows(replica: Replica, data: EvalSet, plan: list[tuple], cfg: Config, bar) -> list[dict]:
    """One row per (control, seed, heads) of the plan on one eval set, with every metric and its interval."""
    rows = []
    for control, seed, removed in plan:
        row = evaluate(replica, data, removed, cfg, intervals=True)
        metrics = {key: value for key, value in row.items() if key not in ("set", "k")}
        rows.append({"set": data.name, "url": data.url, "control": control, "seed": seed, "k": len(removed),
                     "heads": " ".join(f"{l}.{h}" for l, h in removed), **metrics,
                     "n_images": len(data.labels), "n_unreadable": len(data.skipped), "n_mask_images": len(data.fg),
                     "bir_in_sample": data.in_sample, "chance": data.chance, "collapsed": collapsed(row, data.chance)})
        bar.update(1)
    return rows


def run_experiments(pipeline: Pipeline, sets: list[EvalSet], ks: list[int], seeds: list[int], scores: list[str],
                    progress: bool) -> list[dict]:
    """The intact model and, for each K > 0, the top K by each score and the controls, on every eval set."""
    rankings = pipeline.run.read_table("rankings.parquet")
    plan = [("intact", None, [])] + [c for k in ks if k > 0
                                     for c in control_heads(rankings, pipeline.adapter.heads, k, seeds, scores)]
    with progress_bar("prune", len(plan) * len(sets), 0, "eval", progress) as bar:
        return [row for data in sets for row in experiment_rows(pipeline.worker.replica, data, plan, pipeline.cfg, bar)]


# -- automatic K ----------------------------------------------------------------------------------

def default_k_grid(n_heads: int) -> list[int]:
    """1, 2, 4, ... up to half the heads: removing more than half is not a fix for a shortcut."""
    ks, k = [], 1
    while k <= max(1, n_heads // 2):
        ks.append(k)
        k *= 2
    return ks


def auto_k_rows(pipeline: Pipeline, data: EvalSet, ks: list[int], seeds: list[int], scores: list[str],
                max_clean_drop: float, progress: bool) -> list[dict]:
    """The intact model, the top K by each score for growing K, and K random heads at each K evaluated.

    A score stops growing K once two K in a row break the guard: clean accuracy only falls further as
    more heads go, and each evaluation is a pass over the held-out images.
    """
    rankings = pipeline.run.read_table("rankings.parquet")
    replica, cfg = pipeline.worker.replica, pipeline.cfg
    with progress_bar("auto-k", 1 + len(ks) * (len(scores) + len(seeds)), 0, "eval", progress) as bar:
        plan = [("intact", None, [])]
        rows = experiment_rows(replica, data, plan, cfg, bar)
        intact = rows[0]["accuracy"]
        evaluated: set[int] = set()
        for score in scores:
            broken = 0
            for k in ks:
                if broken == 2:
                    bar.update(1)
                    continue
                row, = experiment_rows(replica, data, [(score, None, top_heads(rankings, k, score=score))], cfg, bar)
                rows.append(row)
                evaluated.add(k)
                broken = broken + 1 if intact - row["accuracy"] > max_clean_drop else 0
        for k in ks:
            if k in evaluated:
                rows += experiment_rows(replica, data, [("random", s, random_heads(pipeline.adapter.heads, k, s))
                                                        for s in seeds], cfg, bar)
            else:
                bar.update(len(seeds))
    return rows


def choose_pruning(rows: list[dict], max_clean_drop: float) -> tuple[dict | None, list[dict]]:
    """The (score, K) that lowers mean BIR most while clean accuracy drops by at most `max_clean_drop`
    and the model does not collapse; ties go to the smaller K. Returns (chosen row or None, every score
    row with its clean_drop, bir_change and verdict). Random rows are the control, never chosen."""
    intact = next(r for r in rows if r["control"] == "intact")
    judged = []
    for r in rows:
        if r["control"] not in SCORES:
            continue
        r = {**r, "clean_drop": intact["accuracy"] - r["accuracy"], "bir_change": r["bir_mean"] - intact["bir_mean"]}
        if r["collapsed"]:
            r["verdict"] = "collapsed"
        elif r["clean_drop"] > max_clean_drop + 1e-12:
            r["verdict"] = f"clean accuracy drop {r['clean_drop']:.3f} > {max_clean_drop:g}"
        elif not r["bir_change"] < 0:
            r["verdict"] = "does not lower BIR"
        else:
            r["verdict"] = "within guard"
        judged.append(r)
    passing = [r for r in judged if r["verdict"] == "within guard"]
    order = list(SCORES)
    chosen = min(passing, key=lambda r: (r["bir_change"], r["k"], order.index(r["control"])), default=None)
    if chosen is not None:
        chosen["verdict"] = "chosen"
    return chosen, judged


def auto_k_report(rows: list[dict], chosen: dict | None, judged: list[dict], max_clean_drop: float,
                  data: EvalSet, cfg: Config) -> tuple[str, str]:
    """The trade-off table (every score and K, random K as control) and why the choice was made;
    (the whole text, its "chosen: ..." line)."""
    intact = next(r for r in rows if r["control"] == "intact")
    ks = sorted({r["k"] for r in judged})
    table = [["none", "", cell(intact["accuracy"], intact["accuracy_low"], intact["accuracy_high"]), "",
              cell(intact["bir_mean"], intact["bir_mean_low"], intact["bir_mean_high"]), "", ""]]
    for k in ks:
        for r in [j for j in judged if j["k"] == k]:
            table.append([CONTROL_NAMES[r["control"]].format(k=k), r["heads"],
                          cell(r["accuracy"], r["accuracy_low"], r["accuracy_high"]), f"{r['clean_drop']:+.3f}",
                          cell(r["bir_mean"], r["bir_mean_low"], r["bir_mean_high"]), f"{r['bir_change']:+.3f}",
                          r["verdict"]])
        draws = [r for r in rows if r["control"] == "random" and r["k"] == k]
        if draws:
            acc, bir = [r["accuracy"] for r in draws], [r["bir_mean"] for r in draws]
            gone = sum(r["collapsed"] for r in draws)
            table.append([f"{k} random (mean of {len(draws)})", "", cell(float(np.mean(acc)), min(acc), max(acc)),
                          f"{intact['accuracy'] - float(np.mean(acc)):+.3f}", cell(float(np.mean(bir)), min(bir), max(bir)),
                          f"{float(np.mean(bir)) - intact['bir_mean']:+.3f}",
                          "control" + (f"; {gone} of {len(draws)} collapsed" if gone else "")])
    lines = [f"held-out images: {len(data.labels)} correctly classified images of {data.url} that the scores never "
             f"saw (clean accuracy starts at {intact['accuracy']:.3f}); BIR from {len(data.fg)} of them, masks learned "
             "on the intact model",
             f"guard: clean accuracy may drop by at most {max_clean_drop:g} (max_clean_drop); [low, high]: "
             f"{cfg.ci_level:.0%} bootstrap interval (random rows: [min, max] over the draws)", "",
             format_table(["heads removed", "heads", "clean accuracy", "drop", "BIR (mean)", "change", "verdict"],
                          table, "llrrrrl"), ""]
    lines += collapse_notes([r for r in rows if r["control"] in SCORES])
    if chosen is None:
        reason = ("chosen: none. No score and K lowers held-out BIR without breaking the guard or collapsing the "
                  "model: keep the model intact (K = 0), or allow a larger drop with --max-clean-drop.")
        return "\n".join(lines + [reason]), reason
    k = chosen["k"]
    reason = (f"chosen: the top {k} by {chosen['control']} ({chosen['heads']}): held-out BIR {intact['bir_mean']:.3f} "
              f"-> {chosen['bir_mean']:.3f} ({chosen['bir_change']:+.3f}), clean accuracy {chosen['accuracy']:.3f} "
              f"(drop {chosen['clean_drop']:.3f} <= {max_clean_drop:g}); the largest BIR reduction of the "
              f"{sum(j['verdict'] in ('chosen', 'within guard') for j in judged)} settings within the guard.")
    lines.append(reason)
    tempting = [j for j in judged if j["bir_change"] < chosen["bir_change"] and j["verdict"] != "chosen"]
    if tempting:
        best = min(tempting, key=lambda j: j["bir_change"])
        lines.append(f"rejected: the top {best['k']} by {best['control']} lowers BIR more ({best['bir_change']:+.3f}) "
                     f"but {best['verdict']}.")
    draws = [r["bir_mean"] for r in rows if r["control"] == "random" and r["k"] == k]
    if draws and min(draws) <= chosen["bir_mean"]:
        lines.append(f"caution: {sum(d <= chosen['bir_mean'] for d in draws)} of {len(draws)} draws of {k} random heads "
                     f"lowered BIR as far (down to {min(draws):.3f}): the ranking is not clearly better than chance here.")
    elif draws:
        lines.append(f"{k} random head{'s' if k > 1 else ''}, for comparison: BIR {float(np.mean(draws)):.3f} on average "
                     f"(best of {len(draws)} draws {min(draws):.3f}).")
    return "\n".join(lines), reason


# -- output ----------------------------------------------------------------------------------------

def cell(point: float, low: float, high: float) -> str:
    if math.isnan(point):
        return "n/a"
    return f"{point:.3f}" if math.isnan(low) else f"{point:.3f} [{low:.3f}, {high:.3f}]"


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of one eval set: intact, then per K the top K by each score, random K (mean [min, max] over draws), lowest K."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        for control in CONTROLS:
            group = [r for r in rows if r["k"] == k and r["control"] == control]
            if not group:
                continue
            label = CONTROL_NAMES[control].format(k=k)
            if control == "random":
                label += f" (mean of {len(group)})"
                values = [cell(float(np.mean([r[m] for r in group])), min(r[m] for r in group), max(r[m] for r in group))
                          for m in COLUMNS]
            else:
                values = [cell(group[0][m], group[0][f"{m}_low"], group[0][f"{m}_high"]) for m in COLUMNS]
            out.append([label] + values)
    return out


def collapse_notes(rows: list[dict]) -> list[str]:
    notes = []
    for k in sorted({r["k"] for r in rows}):
        for control in CONTROLS:
            group = [r for r in rows if r["k"] == k and r["control"] == control]
            bad = [r for r in group if r["collapsed"]]
            if not bad:
                continue
            r = bad[0]
            who = CONTROL_NAMES[control].format(k=k) + (f" ({len(bad)} of {len(group)} draws)" if control == "random" else "")
            notes.append(f"collapsed: {who}: accuracy {r['accuracy']:.3f} is chance (1/{round(1 / r['chance'])}) and mean "
                         f"FIG {r['fig']:.4f}, BIG {r['big']:.4f} are near zero: the pruned model no longer uses the image")
    return notes


def report(rows: list[dict], cfg: Config, seeds: list[int]) -> str:
    """The terminal output: one table per eval set, with what its intervals and controls mean."""
    intervals = (f"[low, high]: {cfg.ci_level:.0%} bootstrap interval over images ({cfg.bootstrap} resamples); "
                 if cfg.bootstrap else "no intervals (config bootstrap: 0); ")
    lines = [intervals + f"random rows: mean of {len(seeds)} draws [min, max over the draws]"]
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        first = group[0]
        bir = (f"BIR on the {first['n_mask_images']} images of D with the run's masks: in-sample, the images the heads "
               "were ranked on" if first["bir_in_sample"] else
               f"BIR on {first['n_mask_images']} images, masks learned on the intact model")
        unreadable = f", {first['n_unreadable']} unreadable left out" if first["n_unreadable"] else ""
        lines += ["", f"{name}: {first['url']} ({first['n_images']} images{unreadable}; {bir})",
                  format_table(["heads removed", *COLUMNS.values()], table_rows(group), "l" + "r" * len(COLUMNS))]
        lines += collapse_notes(group)
    return "\n".join(lines)


def heads_lines(rankings: pa.Table, ks: list[int], scores: list[str]) -> list[str]:
    top = max(ks)
    if top == 0:
        return []
    def named(heads):
        return " ".join(f"{l}.{h}" for l, h in heads)
    first = "the first K are the top K" if len(ks) > 1 else f"top {top}"
    return ([f"by {score} ({first}): {named(top_heads(rankings, top, score=score))}" for score in scores]
            + [f"lowest-scored first: {named(top_heads(rankings, top, lowest=True))}"])


STYLES = {"big_drop": ("top K by big_drop (paper)", "tab:red", "o"), "bir_drop": ("top K by bir_drop", "tab:purple", "D"),
          "big_minus_fig": ("top K by big_minus_fig", "tab:orange", "v"), "random": ("K random heads", "tab:blue", "s"),
          "lowest": ("K lowest-scored", "tab:green", "^")}


def sweep_figure(rows: list[dict], ci_level: float) -> bytes:
    """Accuracy and mean BIR against K, a row of panels per eval set: the top K by each score with its
    bootstrap band, random heads as the mean of the draws with a min-max band, the lowest-scored; every
    line starts at the intact model, and a black cross marks a pruning that collapsed the model."""
    from matplotlib.figure import Figure

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig = Figure(figsize=(11, 3.6 * len(sets)), layout="constrained")
    axes = fig.subplots(len(sets), 2, squeeze=False)
    for panels, name in zip(axes, sets):
        group = [r for r in rows if r["set"] == name]
        intact = next(r for r in group if r["control"] == "intact")
        ks = sorted({r["k"] for r in group if r["k"] > 0})
        for ax, metric, title in zip(panels, ("accuracy", "bir_mean"), ("accuracy", "BIR (mean over images)")):
            collapse_label = "collapsed (chance, FIG and BIG ~ 0)"
            for control, (legend, colour, marker) in STYLES.items():
                draws = [[r for r in group if r["control"] == control and r["k"] == k] for k in ks]
                if not any(draws):
                    continue
                values = [[r[metric] for r in d] for d in draws]
                if control == "random":
                    low, high = [min(v) for v in values], [max(v) for v in values]
                else:
                    low, high = [d[0][f"{metric}_low"] for d in draws], [d[0][f"{metric}_high"] for d in draws]
                x, y = [0] + ks, [intact[metric]] + [float(np.mean(v)) for v in values]
                ax.plot(x, y, color=colour, marker=marker, label=legend)
                if control != "lowest":
                    ax.fill_between(x, [intact[f"{metric}_low"]] + low, [intact[f"{metric}_high"]] + high, color=colour,
                                    alpha=0.1, linewidth=0)
                if control in SCORES:
                    gone = [(k, y[i + 1]) for i, (k, d) in enumerate(zip(ks, draws)) if d[0]["collapsed"]]
                    if gone:
                        ax.scatter(*zip(*gone), marker="x", s=60, color="black", zorder=5, label=collapse_label)
                        collapse_label = None
            if metric == "accuracy":
                ax.axhline(intact["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
                ax.set_ylim(-0.02, 1.02)
            in_sample = " (in-sample: D)" if metric == "bir_mean" and intact["bir_in_sample"] else ""
            ax.set_title(f"{name}: {title}{in_sample}")
            ax.set_xlabel("K (heads removed together; 0 = intact)")
            ax.set_xticks([0] + ks)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize="small")
    fig.suptitle(f"Bands: {ci_level:.0%} bootstrap interval over images for each score; random heads min-max over draws")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# -- commands --------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace, ks: list[int] | None,
            load_sets: bool = True) -> tuple[Pipeline, list[EvalSet], list[int], list[int]]:
    """Check the run, K (None: the run's top_k) and the options before any model or image is loaded;
    then (the run's pipeline, eval sets (none without `load_sets`), random seeds, K values)."""
    from .cli import check_device, open_run

    run = open_run(args.run)
    meta = run.read_json("run.json")
    if not run.exists("rankings.parquet"):
        raise StorageError(f"{args.run} has no rankings.parquet yet, so there are no top heads to {args.command}: "
                           f"finish the run with the scan command that made it (`cigma-ray scan --model "
                           f"{meta['model']['name']} --data {meta['data']['url']} --out {args.run} ...`; "
                           f"`cigma-ray status {args.run}` says what is missing)")
    n_heads = sum(meta["plan"]["heads_per_layer"])
    ks = [resolve_k(meta["config"]["top_k"], n_heads)] if ks is None else ks
    for k in ks:
        check_k(k, n_heads, "--k", allow_zero=args.command == "sweep")
    parse_scores(args.scores, meta)
    if args.mask_images < 1 or args.random_seeds < 1:
        raise ConfigError("--mask-images and --random-seeds must be at least 1")
    pipeline = open_scanned(run, check_device(args.device), args.checkpoint)
    seeds = [pipeline.cfg.seed + i for i in range(args.random_seeds)]
    return pipeline, eval_sets(pipeline, args.eval_data, args.mask_images) if load_sets else [], seeds, ks


def cmd_prune(args: argparse.Namespace) -> int:
    if args.auto_k:
        return cmd_auto_k(args)
    pipeline, sets, seeds, (k,) = prepare(args, None if args.k is None else [args.k])
    scores = parse_scores(args.scores, pipeline.manifest)
    rows = run_experiments(pipeline, sets, [k], seeds, scores, not args.quiet)
    out = f"eval/prune-k{k}.parquet"
    pipeline.run.write_table(out, pa.Table.from_pylist(rows))
    print(f"removing {k} heads together, the top by {', '.join(scores)}, against {k} random heads and the {k} "
          f"lowest by {pipeline.cfg.score}:")
    print("\n".join(heads_lines(pipeline.run.read_table("rankings.parquet"), [k], scores)))
    print(report(rows, pipeline.cfg, seeds))
    print(f"\nresults in {pipeline.run.path(out)}")
    return 0


def cmd_auto_k(args: argparse.Namespace) -> int:
    if args.k is not None:
        raise ConfigError("--auto-k chooses K itself; give the K values to try with --k-grid, not --k")
    if args.eval_data and len(args.eval_data) > 1:
        raise ConfigError("--auto-k judges on one held-out data set: give --eval-data once (default: the scan's "
                          "images outside D)")
    pipeline, _, seeds, _ = prepare(args, [], load_sets=False)
    cfg = pipeline.cfg
    max_drop = cfg.max_clean_drop if args.max_clean_drop is None else args.max_clean_drop
    if not 0 <= max_drop <= 1:
        raise ConfigError(f"--max-clean-drop {max_drop}: a fraction of accuracy in [0, 1], e.g. 0.02")
    n_heads = len(pipeline.adapter.heads)
    ks = default_k_grid(n_heads) if args.k_grid is None else [k for k in parse_ks(args.k_grid) if k > 0]
    for k in ks:
        check_k(k, n_heads, "--k-grid")
    scores = parse_scores(args.scores, pipeline.manifest)
    data = heldout_set(pipeline, args.eval_data[0] if args.eval_data else None, args.mask_images)
    print(f"choosing the score and K on held-out images, K in {', '.join(map(str, ks))}, scores {', '.join(scores)}:")
    choice = auto_k(pipeline, data, ks, seeds, scores, max_drop, not args.quiet)
    if choice["k"]:
        print(f"\nto export it: cigma-ray export {args.run} --k {choice['k']} --score {choice['score']} --out pruned.pth")
    print(f"results in {pipeline.run.path('eval/auto-k.parquet')} and {pipeline.run.path('eval/auto-k.json')}")
    return 0


def auto_k(pipeline: Pipeline, data: EvalSet, ks: list[int], seeds: list[int], scores: list[str],
           max_clean_drop: float, progress: bool) -> dict:
    """Evaluate, choose, print the trade-off table and write eval/auto-k.parquet and eval/auto-k.json;
    returns the choice (score None and k 0 when nothing passes the guard)."""
    rows = auto_k_rows(pipeline, data, ks, seeds, scores, max_clean_drop, progress)
    chosen, judged = choose_pruning(rows, max_clean_drop)
    verdicts = {(j["control"], j["k"]): j["verdict"] for j in judged}
    pipeline.run.write_table("eval/auto-k.parquet", pa.Table.from_pylist(
        [{**r, "verdict": verdicts.get((r["control"], r["k"]), "control" if r["control"] == "random" else "")}
         for r in rows]))
    text, reason = auto_k_report(rows, chosen, judged, max_clean_drop, data, pipeline.cfg)
    choice = {"score": chosen and chosen["control"], "k": chosen["k"] if chosen else 0,
              "heads": chosen["heads"] if chosen else "", "max_clean_drop": max_clean_drop, "set": data.url,
              "n_images": len(data.labels), "reason": reason}
    pipeline.run.write_bytes("eval/auto-k.json", json.dumps(choice, indent=2).encode())
    print(text)
    return choice


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ConfigError(f"--k {text!r}: write K values separated by commas, e.g. --k 0,4,8,16") from None
    return ks


def sweep(pipeline: Pipeline, sets: list[EvalSet], ks: list[int], seeds: list[int], scores: list[str],
          progress: bool) -> list[dict]:
    """run_experiments for several K, saved as eval/sweep.parquet and plotted in eval/sweep.png."""
    rows = run_experiments(pipeline, sets, ks, seeds, scores, progress)
    pipeline.run.write_table("eval/sweep.parquet", pa.Table.from_pylist(rows))
    pipeline.run.write_bytes("eval/sweep.png", sweep_figure(rows, pipeline.cfg.ci_level))
    return rows


def cmd_sweep(args: argparse.Namespace) -> int:
    pipeline, sets, seeds, ks = prepare(args, parse_ks(args.k))
    scores = parse_scores(args.scores, pipeline.manifest)
    rows = sweep(pipeline, sets, ks, seeds, scores, not args.quiet)
    print(f"removing K heads together for K = {', '.join(map(str, ks))}: the top K by {', '.join(scores)}, against "
          f"K random and the K lowest by {pipeline.cfg.score}:")
    print("\n".join(heads_lines(pipeline.run.read_table("rankings.parquet"), ks, scores)))
    print(report(rows, pipeline.cfg, seeds))
    print(f"\nresults in {pipeline.run.path('eval/sweep.parquet')}, plot in {pipeline.run.path('eval/sweep.png')}")
    return 0


def add_prune_parsers(subparsers) -> None:
    """Register `prune` and `sweep` on the `cigma-ray` sub-command parser."""
    prune = subparsers.add_parser("prune", help="remove a run's top-K heads together and evaluate against K random "
                                  "and K lowest-scored heads", description="Evaluates the intact model, the model "
                                  "without the top K heads by each of the run's scores, K random heads (several draws) and the K "
                                  "lowest-scored heads on each eval set: accuracy, BIR (mean and ratio of means), NLL "
                                  "and ECE, with bootstrap intervals. Writes RUN/eval/prune-kK.parquet.")
    prune.add_argument("run", help="run directory with a rankings.parquet")
    prune.add_argument("--k", type=int, help="heads to remove (default: the run's top_k)")
    prune.add_argument("--auto-k", action="store_true", help="choose the score and K on held-out images: the most "
                       "BIR reduction with clean accuracy dropping by at most --max-clean-drop; prints the trade-off "
                       "table, writes eval/auto-k.parquet and eval/auto-k.json")
    prune.add_argument("--max-clean-drop", type=float, metavar="F", help="with --auto-k: the most clean accuracy "
                       "(on correctly classified held-out images) a pruning may cost (default: config key "
                       "max_clean_drop, 0.02)")
    prune.add_argument("--k-grid", metavar="K1,K2,...", help="with --auto-k: the K values to try (default 1, 2, 4, ... "
                       "up to half the heads)")
    sweep = subparsers.add_parser("sweep", help="prune for several K; table, eval/sweep.parquet and eval/sweep.png",
                                  description="`prune` for each K, with a plot of accuracy and BIR against K for "
                                  "the top K by each score and the controls (RUN/eval/sweep.png).")
    sweep.add_argument("run", help="run directory with a rankings.parquet")
    sweep.add_argument("--k", required=True, metavar="K1,K2,...", help="numbers of heads to remove, e.g. 0,4,8,16")
    for p, func in ((prune, cmd_prune), (sweep, cmd_sweep)):
        p.add_argument("--eval-data", action="append", metavar="PATH", help="ImageFolder directory or Parquet table "
                       "to evaluate on, as --data of scan; repeat for several (default: the scan's own data; with "
                       "--auto-k, once, default: the scan's correctly classified images outside D)")
        p.add_argument("--mask-images", type=int, default=MASK_IMAGES, metavar="N", help="images per eval set whose masks are "
                       f"learned for BIR (default {MASK_IMAGES}; the scan's own data uses the run's masks of D)")
        p.add_argument("--random-seeds", type=int, default=RANDOM_SEEDS, metavar="N", help="draws of K random heads "
                       f"(default {RANDOM_SEEDS})")
        p.add_argument("--scores", metavar="S1,S2", help="which of the run's scores rank the heads, comma-separated: "
                       f"{', '.join(SCORES)} (default: every score the run has)")
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
        p.add_argument("--checkpoint", metavar="FILE", help="the scanned weights, when the file has moved since the scan")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=func)
