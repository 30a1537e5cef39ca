"""`cigma-ray screen`: the pre-screen's top heads and its fidelity to the exact scan."""
from __future__ import annotations

import numpy as np

from ..method import SCORES
from ..rundir import Run
from .tables import format_table


def screen_text(run: Run, heads: list[tuple[int, int]], estimates: dict[str, np.ndarray], result: dict, top: int,
                why: str | None) -> str:
    """The estimates of the run's score for its best heads (the other scores beside them), then the fidelity."""
    name = run.score if run.score in estimates else "big_drop"
    order = np.argsort(-estimates[name], kind="stable")[:top]
    others = [s for s in estimates if s != name]
    rank_of = {s: np.argsort(np.argsort(-v, kind="stable"), kind="stable") + 1 for s, v in estimates.items()}
    rows = [[i + 1, heads[h][0], heads[h][1], f"{estimates[name][h]:+.5f}"]
            + [f"{estimates[o][h]:+.5f} ({rank_of[o][h]})" for o in others] for i, h in enumerate(order)]
    lines = [f"gradient pre-screen of {run.url}: {result['images']} images of D, one forward and one backward per view "
             f"and image ({result['seconds']:.1f} s); first-order estimates of each head's score (the derivative at "
             "its output gate = 1: an estimate of removing it, not a measurement)",
             "",
             f"top {len(rows)} heads by the estimate of {name}: {SCORES[name]}",
             format_table(["rank", "layer", "head", f"{name} (est.)"] + [f"{o} (est., rank)" for o in others], rows,
                          "rrrr" + "r" * len(others))]
    fid = result["fidelity"]
    if fid:
        k = result["k"]
        lines += ["", f"fidelity to the exact scan of this run (K = {k}): Spearman's rank correlation over all heads, "
                  f"and the share of the exact top K found in the screen's top K, 2K and 4K",
                  format_table(["score", "Spearman", f"recall@{k}", f"@{2 * k}", f"@{4 * k}"],
                               [[s, f"{f['spearman']:.3f}", f"{f['recall_k']:.2f}", f"{f['recall_2k']:.2f}",
                                 f"{f['recall_4k']:.2f}"] for s, f in fid.items()], "lrrrr")]
    else:
        lines += ["", f"no fidelity: {why}"]
    lines.append(f"\nestimates in {run.dir.path('screen.parquet')}; the screen orders an adaptive scan's work with "
                 "`scan --adaptive --order screen` (it never decides)")
    return "\n".join(lines)
