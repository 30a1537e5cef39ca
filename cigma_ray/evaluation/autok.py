"""Choosing the score and K automatically (`prune --auto-k`), on held-out images, against K random heads.

Two objectives (config key `objective`, `prune --objective`):

- `conflict`: raise counterfactual conflict accuracy (accuracy on the held-out images' foregrounds over
  backgrounds of other classes) most. A setting is eligible when it keeps clean accuracy within
  `max_clean_drop`, does not collapse the model, beats every draw of K random heads, and its gain over
  the intact model is separated from noise: the paired bootstrap interval of the gain (the same images,
  intact and pruned) lies above 0. When the held-out images are too few for any interval to clear 0,
  nothing is chosen and the message says how many images it would take.
- `bir`: lower mean BIR most under the same guard (the first rule; BIR falls when the model stops
  using the image at all, so it is a weaker objective: the benchmarks in the README show where).

The choice is the eligible setting with the largest gain; ties go to the smaller K. A score stops
growing K once two K in a row break the guard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..method import SCORES, bootstrap
from ..progress import ProgressLines
from ..rundir import Scanned
from .evalsets import EvalSet
from .experiments import experiment_rows, random_heads

OBJECTIVES = {
    "conflict": ("conflict_accuracy", +1, "counterfactual conflict accuracy"),  # (row key, direction, name)
    "bir": ("bir_mean", -1, "held-out BIR"),
}


@dataclass
class AutoK:
    """What --auto-k evaluated and chose: every row, the judged score rows (with clean_drop, gain and its
    paired interval, and verdict), the chosen row (None: nothing passes), and the choice as written to
    eval/auto-k.json."""

    rows: list[dict]
    judged: list[dict]
    chosen: dict | None
    choice: dict


def default_k_grid(n_heads: int) -> list[int]:
    """1, 2, 4, ... up to half the heads: removing more than half is not a fix for a shortcut."""
    ks, k = [], 1
    while k <= max(1, n_heads // 2):
        ks.append(k)
        k *= 2
    return ks


def auto_k_rows(scanned: Scanned, data: EvalSet, ks: list[int], seeds: list[int], scores: list[str],
                max_clean_drop: float, progress: bool, per_image: list[dict] | None = None) -> list[dict]:
    """The intact model, the top K by each score for growing K, and K random heads at each K evaluated
    (with `per_image`, the per-image values of each row, in the same order).

    A score stops growing K once two K in a row break the guard: clean accuracy only falls further as
    more heads go, and each evaluation is a pass over the held-out images.
    """
    replica, cfg = scanned.replica, scanned.cfg
    with ProgressLines("auto-k", 1 + len(ks) * (len(scores) + len(seeds)), progress) as bar:
        plan = [("intact", None, [])]
        rows = experiment_rows(replica, data, plan, cfg, bar, per_image)
        intact = rows[0]["accuracy"]
        evaluated: set[int] = set()
        for score in scores:
            broken = 0
            for k in ks:
                if broken == 2:
                    bar.update(1)
                    continue
                row, = experiment_rows(replica, data, [(score, None, scanned.run.top_heads(k, score))], cfg, bar,
                                       per_image)
                rows.append(row)
                evaluated.add(k)
                broken = broken + 1 if intact - row["accuracy"] > max_clean_drop else 0
        for k in ks:
            if k in evaluated:
                rows += experiment_rows(replica, data, [("random", s, random_heads(scanned.heads, k, s))
                                                        for s in seeds], cfg, bar, per_image)
            else:
                bar.update(len(seeds))
    return rows


def paired_gain(intact: np.ndarray, pruned: np.ndarray, direction: int, resamples: int, ci_level: float,
                seed: int) -> tuple[float, float, float]:
    """(gain, low, high): the mean over images of direction x (pruned - intact), with a percentile interval
    over the images' bootstrap resamples (both on the same resamples: a paired comparison). Images where
    either value is undefined (NaN: BIR of an image neither region moves) count as no change."""
    diff = direction * (np.asarray(pruned, np.float64) - np.asarray(intact, np.float64))
    diff = np.where(np.isnan(diff), 0.0, diff)
    return bootstrap({"gain": lambda w: w @ diff / w.sum(axis=1)}, len(diff), resamples, ci_level, seed)["gain"]


def choose_pruning(rows: list[dict], max_clean_drop: float, objective: str = "bir",
                   per_image: list[dict] | None = None, resamples: int = 0, ci_level: float = 0.95,
                   seed: int = 0) -> tuple[dict | None, list[dict]]:
    """The (score, K) that improves the objective most among those that keep clean accuracy within
    `max_clean_drop` and do not collapse the model; ties go to the smaller K. With objective `conflict`,
    a setting must also beat every draw of K random heads and, given `per_image` (aligned with `rows`) and
    `resamples`, its paired gain interval must lie above 0. Returns (chosen row or None, every score row with
    clean_drop, gain, gain_low, gain_high (NaN without intervals), bir_change and verdict). Random rows are
    the control, never chosen."""
    key, direction, name = OBJECTIVES[objective]
    intact_at = next(i for i, r in enumerate(rows) if r["control"] == "intact")
    intact = rows[intact_at]
    values = per_image[intact_at] if per_image else None
    metric = "conflict" if objective == "conflict" else "bir"
    judged = []
    for i, r in enumerate(rows):
        if r["control"] not in SCORES:
            continue
        gain = direction * (r[key] - intact[key])
        low = high = float("nan")
        if values is not None and values.get(metric) is not None and resamples:
            gain, low, high = paired_gain(values[metric], per_image[i][metric], direction, resamples, ci_level, seed)
        r = {**r, "clean_drop": intact["accuracy"] - r["accuracy"], "bir_change": r["bir_mean"] - intact["bir_mean"],
             "gain": gain, "gain_low": low, "gain_high": high}
        draws = [d[key] for d in rows if d["control"] == "random" and d["k"] == r["k"]]
        best_random = max(direction * d for d in draws) * direction if draws else None
        if r["collapsed"]:
            r["verdict"] = "collapsed"
        elif r["clean_drop"] > max_clean_drop + 1e-12:
            r["verdict"] = f"clean accuracy drop {r['clean_drop']:.3f} > {max_clean_drop:g}"
        elif not np.isfinite(gain):
            r["verdict"] = f"{name} not measurable"
        elif not gain > 0:
            r["verdict"] = "does not lower BIR" if objective == "bir" else f"does not raise {name}"
        elif objective == "conflict" and best_random is not None and not direction * r[key] > direction * best_random:
            r["verdict"] = f"no better than {r['k']} random heads (best draw {best_random:.3f})"
        elif objective == "conflict" and np.isfinite(low) and not low > 0:
            r["verdict"] = f"gain within noise (interval [{low:+.3f}, {high:+.3f}])"
        else:
            r["verdict"] = "within guard"
        judged.append(r)
    passing = [r for r in judged if r["verdict"] == "within guard"]
    order = list(SCORES)
    chosen = min(passing, key=lambda r: (-r["gain"], r["k"], order.index(r["control"])), default=None)
    if chosen is not None:
        chosen["verdict"] = "chosen"
    return chosen, judged


def interval_width(values: np.ndarray | None, resamples: int, ci_level: float, seed: int) -> float:
    """Half the width of the intact model's interval of a per-image mean: the smallest gain the held-out
    images can tell apart from noise, roughly (a paired difference is often tighter)."""
    if values is None or not resamples or len(values) < 2:
        return float("nan")
    v = np.where(np.isnan(values), 0.0, np.asarray(values, np.float64))
    _, low, high = bootstrap({"m": lambda w: w @ v / w.sum(axis=1)}, len(v), resamples, ci_level, seed)["m"]
    return (high - low) / 2


def reason(chosen: dict | None, judged: list[dict], rows: list[dict], max_clean_drop: float, objective: str,
           resolution: float = float("nan"), n_images: int = 0, ci_level: float = 0.95) -> str:
    """The choice in words, as eval/auto-k.json and the report give it: what it buys and what it costs."""
    key, _, name = OBJECTIVES[objective]
    intact = next(r for r in rows if r["control"] == "intact")
    if chosen is None:
        noisy = [j for j in judged if j["verdict"].startswith("gain within noise")]
        text = (f"chosen: none. No score and K improves {name} on the held-out images without breaking the guard "
                f"(clean accuracy drop <= {max_clean_drop:g}), collapsing the model or doing no better than random "
                "heads: keep the model intact (K = 0).")
        if noisy:
            best = max(noisy, key=lambda j: j["gain"])
            text += (f" The best candidate, the top {best['k']} by {best['control']} ({best['gain']:+.3f}), is within "
                     f"noise: with {n_images} masked held-out images a difference of about {resolution:.3f} is needed; "
                     "pass more held-out images (--mask-images, or --eval-data with a larger set).")
        return text
    k = chosen["k"]
    draws = [r[key] for r in rows if r["control"] == "random" and r["k"] == k]
    best = (max(draws) if objective == "conflict" else min(draws)) if draws else None
    random_text = (f"; {k} random heads give {float(np.mean(draws)):.3f} on average (best of {len(draws)} draws "
                   f"{best:.3f})" if draws else "")
    interval = (f", paired {ci_level:.0%} interval [{chosen['gain_low']:+.3f}, {chosen['gain_high']:+.3f}]"
                if np.isfinite(chosen.get("gain_low", float("nan"))) else "")
    conflict = (f"; counterfactual conflict accuracy {intact['conflict_accuracy']:.3f} -> "
                f"{chosen['conflict_accuracy']:.3f}" if objective == "bir"
                and np.isfinite(intact.get("conflict_accuracy", float("nan"))) else "")
    bir_text = f"; held-out BIR {intact['bir_mean']:.3f} -> {chosen['bir_mean']:.3f}" if objective == "conflict" else ""
    sign = "+" if objective == "conflict" else "-"
    eligible = sum(j["verdict"] in ("chosen", "within guard") for j in judged)
    return (f"chosen: the top {k} by {chosen['control']} ({chosen['heads']}). It buys {name} {intact[key]:.3f} -> "
            f"{chosen[key]:.3f} ({sign}{chosen['gain']:.3f}{interval}){random_text}. It costs "
            f"{chosen['clean_drop']:.3f} of clean accuracy ({intact['accuracy']:.3f} -> {chosen['accuracy']:.3f}, guard "
            f"{max_clean_drop:g}){bir_text}{conflict}. The largest gain of the {eligible} eligible settings.")


def auto_k(scanned: Scanned, data: EvalSet, ks: list[int], seeds: list[int], scores: list[str],
           max_clean_drop: float, progress: bool, objective: str = "bir") -> AutoK:
    """Evaluate, choose, and write eval/auto-k.parquet and eval/auto-k.json."""
    if objective == "conflict" and not data.swappable:
        from ..data import DataError

        raise DataError(f"--objective conflict: the held-out images of {data.url} are all of one class, so their "
                        "backgrounds cannot be swapped for another class's; use --objective bir, or --eval-data with "
                        "held-out images of several classes")
    per_image: list[dict] = []
    rows = auto_k_rows(scanned, data, ks, seeds, scores, max_clean_drop, progress, per_image)
    cfg = scanned.cfg
    chosen, judged = choose_pruning(rows, max_clean_drop, objective, per_image, cfg.bootstrap, cfg.ci_level, cfg.seed)
    verdicts = {(j["control"], j["k"]): j for j in judged}
    scanned.dir.write_table("eval/auto-k.parquet", pa.Table.from_pylist(
        [{**r, **{f: verdicts[(r["control"], r["k"])][f] if (r["control"], r["k"]) in verdicts else None
                  for f in ("clean_drop", "gain", "gain_low", "gain_high")},
          "verdict": verdicts[(r["control"], r["k"])]["verdict"] if (r["control"], r["k"]) in verdicts else
          ("control" if r["control"] == "random" else "")} for r in rows]))
    metric = "conflict" if objective == "conflict" else "bir"
    resolution = interval_width(per_image[0].get(metric), cfg.bootstrap, cfg.ci_level, cfg.seed)
    choice = {"score": chosen and chosen["control"], "k": chosen["k"] if chosen else 0,
              "heads": chosen["heads"] if chosen else "", "objective": objective, "max_clean_drop": max_clean_drop,
              "set": data.url, "n_images": len(data.labels), "n_mask_images": len(data.fg),
              "n_swaps": int(data.donors.size) if data.swappable else 0, "resolution": resolution,
              "reason": reason(chosen, judged, rows, max_clean_drop, objective, resolution, len(data.fg), cfg.ci_level)}
    if chosen is not None:
        choice.update({k: chosen[k] for k in ("gain", "gain_low", "gain_high", "clean_drop", "accuracy",
                                              "conflict_accuracy", "bir_mean")})
    scanned.dir.write_bytes("eval/auto-k.json", json.dumps(choice, indent=2, default=float).encode())
    return AutoK(rows, judged, chosen, choice)
