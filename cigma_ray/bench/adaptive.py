"""`cigma-ray bench adaptive RUN`: the adaptive scan replayed on a finished exhaustive run's deltas (no model):
the ablated forwards it would have used, whether its top-K set is the exhaustive one, and how the saving
grows with N (replays on bootstrap resamples of D's images at several multiples of its size)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..method import available_scores
from ..method.adaptive import SCORE_RANGES, replay, replay_resampled, term_bounds
from ..pipeline.adaptive import lead_heads
from ..pipeline.ranking import score_matrices
from ..pipeline.units import scan_units
from ..rundir import Run, open_run
from .suite import machine


@dataclass(frozen=True)
class AdaptiveBench:
    """What `bench adaptive` replays: the run, K (None: the run's top_k), delta, the scales and replays per
    scale, and the order (screen: lead with the run's screen.parquet, from `cigma-ray screen RUN`)."""

    run: str
    delta: float = 0.05
    top_k: int | float | None = None
    scales: tuple[int, ...] = (1, 4, 16)
    resamples: int = 1
    order: str = "none"
    score: str | None = None
    first: int | None = None
    growth: float | None = None
    bet_cap: float = 0.9
    bound: object = "betting"
    json: str | None = None  # also write the numbers here


def exhaustive_matrices(run: Run) -> tuple[dict[str, np.ndarray], pa.Table]:
    """An exhaustive run's (heads, images) matrices of every score it measured, read the way the ranking reads
    them, and D's masks (image_id, big and with measure_fig fig, by image id: the matrices' columns); an
    adaptive or iterative run is refused by name."""
    cfg = run.config
    if run.adaptive:
        raise ConfigError(f"{run.url} is an adaptive run: replays need an exhaustive scan (every head on every image)")
    if run.rounds > 1:
        raise ConfigError(f"{run.url} is an iterative run (rounds={run.rounds}); replay a single-round scan")
    run.require_rankings("replay")
    masks = run.masks(["image_id", "big"] + (["fig"] if cfg.measure_fig else []))
    ids = masks["image_id"].to_pylist()
    names = available_scores(cfg.measure_fig, cfg.measure_swap)
    units = scan_units(ids, cfg, run.heads_per_layer)
    return score_matrices(run.dir, units, run.heads, ids, names), masks


def replay_bench(s: AdaptiveBench) -> dict:
    """Every number `bench adaptive` prints, as a dict (tests check them)."""
    run = open_run(s.run)
    cfg = run.config
    score = s.score or cfg.score
    matrices, masks = exhaustive_matrices(run)
    n_images = masks.num_rows
    if score not in matrices:
        raise ConfigError(f"--score {score}: the run's scan did not measure FIG^(-h) (measure_fig: false); it has "
                          f"{', '.join(matrices)}")
    matrix = matrices[score]
    k = run.resolve_k(None) if s.top_k is None else (
        cfg.replace(top_k=s.top_k).k_of(run.n_heads) if isinstance(s.top_k, float) else run.resolve_k(s.top_k, "--top-k"))
    if k >= run.n_heads:
        raise ConfigError(f"--top-k {k}: the run has {run.n_heads} heads; an adaptive scan needs K below that")
    lead = None
    if s.order == "screen":
        if not run.dir.exists("screen.parquet"):
            raise ConfigError(f"--order screen: {run.url} has no screen.parquet; run `cigma-ray screen {run.url}` first")
        estimates = run.dir.read_table("screen.parquet").sort_by([("layer", "ascending"), ("head", "ascending")])
        lead = lead_heads(estimates[score].to_numpy(), k)
    low, high = SCORE_RANGES[score]
    bounds = term_bounds(score, masks["big"].to_numpy(), masks["fig"].to_numpy() if cfg.measure_fig else None)
    options = dict(delta=s.delta, first=s.first or cfg.adaptive_first, growth=s.growth or cfg.adaptive_growth,
                   bet_cap=s.bet_cap, bound=s.bound, lead=lead, bounds=bounds)
    views = 3 if cfg.measure_fig else 2
    start = time.perf_counter()
    res = replay(matrix, k, low=low, high=high, seed=cfg.seed, **options)
    rows = [{"scale": "D", "resample": 0, "images": n_images, "pairs": res.pairs, "exhaustive_pairs": res.exhaustive_pairs,
             "saving": res.saving, "matched": res.extra["matched"], "rounds": res.rounds, "heavy": res.extra["heavy"]}]
    rows += replay_resampled(matrix, k, low=low, high=high, scales=s.scales, resamples=s.resamples, seed=cfg.seed,
                             **options)
    for r in rows:
        r["forwards"], r["exhaustive_forwards"] = r["pairs"] * views, r["exhaustive_pairs"] * views
        if lead is not None:  # the screen: a forward and a backward (about 2 forwards) per view and image
            r["screen_forwards"] = 3 * views * r["images"]
            r["saving_with_screen"] = r["exhaustive_forwards"] / (r["forwards"] + r["screen_forwards"])
    means = np.sort(matrix.mean(axis=1))[::-1]
    return {"run": run.url, "model": run.meta["model"]["name"], "heads": run.n_heads, "images": n_images,
            "views": views, "score": score, "k": k, "delta": s.delta, "order": s.order, "first": options["first"],
            "growth": options["growth"], "bet_cap": s.bet_cap, "bound": s.bound if isinstance(s.bound, str) else "custom",
            "kth_score": float(means[k - 1]), "next_score": float(means[k]), "median_score": float(np.median(means)),
            "term_spread": float(np.median(matrix.std(axis=1))),
            "decided_in": int((res.decided == "in").sum()), "decided_out": int((res.decided == "out").sum()),
            "rows": rows, "seconds": time.perf_counter() - start, "machine": machine()}
