"""Choosing the score and K automatically (`prune --auto-k`): on held-out images, the pruning that
lowers mean BIR most while clean accuracy drops by at most `max_clean_drop` and the model does not
collapse; K random heads at each K as the control."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from ..method import SCORES
from ..progress import ProgressLines
from ..rundir import Scanned
from .evalsets import EvalSet
from .experiments import experiment_rows, random_heads


@dataclass
class AutoK:
    """What --auto-k evaluated and chose: every row, the judged score rows (with clean_drop,
    bir_change and verdict), the chosen row (None: nothing passes), and the choice as written to
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
                max_clean_drop: float, progress: bool) -> list[dict]:
    """The intact model, the top K by each score for growing K, and K random heads at each K evaluated.

    A score stops growing K once two K in a row break the guard: clean accuracy only falls further as
    more heads go, and each evaluation is a pass over the held-out images.
    """
    replica, cfg = scanned.replica, scanned.cfg
    with ProgressLines("auto-k", 1 + len(ks) * (len(scores) + len(seeds)), progress) as bar:
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
                row, = experiment_rows(replica, data, [(score, None, scanned.run.top_heads(k, score))], cfg, bar)
                rows.append(row)
                evaluated.add(k)
                broken = broken + 1 if intact - row["accuracy"] > max_clean_drop else 0
        for k in ks:
            if k in evaluated:
                rows += experiment_rows(replica, data, [("random", s, random_heads(scanned.heads, k, s))
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


def reason(chosen: dict | None, judged: list[dict], intact: dict, max_clean_drop: float) -> str:
    """The choice in one sentence, as eval/auto-k.json and the report give it."""
    if chosen is None:
        return ("chosen: none. No score and K lowers held-out BIR without breaking the guard or collapsing the "
                "model: keep the model intact (K = 0), or allow a larger drop with --max-clean-drop.")
    return (f"chosen: the top {chosen['k']} by {chosen['control']} ({chosen['heads']}): held-out BIR "
            f"{intact['bir_mean']:.3f} -> {chosen['bir_mean']:.3f} ({chosen['bir_change']:+.3f}), clean accuracy "
            f"{chosen['accuracy']:.3f} (drop {chosen['clean_drop']:.3f} <= {max_clean_drop:g}); the largest BIR "
            f"reduction of the {sum(j['verdict'] in ('chosen', 'within guard') for j in judged)} settings within "
            "the guard.")


def auto_k(scanned: Scanned, data: EvalSet, ks: list[int], seeds: list[int], scores: list[str],
           max_clean_drop: float, progress: bool) -> AutoK:
    """Evaluate, choose, and write eval/auto-k.parquet and eval/auto-k.json."""
    rows = auto_k_rows(scanned, data, ks, seeds, scores, max_clean_drop, progress)
    chosen, judged = choose_pruning(rows, max_clean_drop)
    verdicts = {(j["control"], j["k"]): j["verdict"] for j in judged}
    scanned.dir.write_table("eval/auto-k.parquet", pa.Table.from_pylist(
        [{**r, "verdict": verdicts.get((r["control"], r["k"]), "control" if r["control"] == "random" else "")}
         for r in rows]))
    intact = next(r for r in rows if r["control"] == "intact")
    choice = {"score": chosen and chosen["control"], "k": chosen["k"] if chosen else 0,
              "heads": chosen["heads"] if chosen else "", "max_clean_drop": max_clean_drop, "set": data.url,
              "n_images": len(data.labels), "reason": reason(chosen, judged, intact, max_clean_drop)}
    scanned.dir.write_bytes("eval/auto-k.json", json.dumps(choice, indent=2).encode())
    return AutoK(rows, judged, chosen, choice)
