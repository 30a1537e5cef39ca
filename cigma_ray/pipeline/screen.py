"""The gradient pre-screen as a stage: one unit per mask batch of D writes every head's gate derivatives
of BIG_i (and FIG_i) per image (screen/part-XXXXX.parquet); the per-head estimates of each score are
their first-order terms (`method.fidelity.screen_terms`) averaged over D."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import Config
from ..method import ranks
from ..method.fidelity import screen_terms
from ..rundir import RunDir
from .units import Unit, shards


def screen_units(selected: list[int], cfg: Config) -> list[Unit]:
    """One unit per mask batch of D (its images are exactly that mask file's)."""
    return [Unit("screen", g, ids, inputs=(Unit("mask", g, ()).file,))
            for g, ids in enumerate(shards(selected, cfg.mask_batch))]


def screen_matrices(run: RunDir, units: list[Unit], heads: list[tuple[int, int]], images: list[int],
                    names: list[str]) -> dict[str, np.ndarray]:
    """(heads, images) matrices of the screen's estimated terms of the named scores, read unit by unit; a
    screen file holds every head of the model, so rows of heads not in `heads` (skipped layers) are left out."""
    index = {h: i for i, h in enumerate(heads)}
    column = {image: j for j, image in enumerate(images)}
    needs_fig = any(name != "big_drop" for name in names)
    grad_big = np.full((len(heads), len(images)), np.nan)
    grad_fig = np.full_like(grad_big, np.nan) if needs_fig else None
    big, fig = np.full(len(images), np.nan), np.full(len(images), np.nan)
    for unit in units:
        columns = ["image_id", "layer", "head", "grad_big", "big"] + (["grad_fig", "fig"] if needs_fig else [])
        t = run.read_table(unit.file, columns)
        t = t.filter(np.array([(l, h) in index for l, h in zip(t["layer"].to_pylist(), t["head"].to_pylist())],
                              dtype=bool))
        if needs_fig and t.num_rows and t.column("grad_fig").null_count:
            raise RuntimeError(f"{unit.file} has no dFIG/dg: the screen ran without measure_fig")
        r = np.array([index[(l, h)] for l, h in zip(t["layer"].to_pylist(), t["head"].to_pylist())], dtype=np.int64)
        c = np.array([column[i] for i in t["image_id"].to_pylist()], dtype=np.int64)
        grad_big[r, c] = t["grad_big"].to_numpy()
        big[c] = t["big"].to_numpy()
        if needs_fig:
            grad_fig[r, c] = t["grad_fig"].to_numpy()
            fig[c] = t["fig"].to_numpy()
    if np.isnan(grad_big).any():
        raise RuntimeError("screen/ does not cover every head and image of D: remove the run's screen/ folder and "
                           "screen again")
    terms = screen_terms(grad_big, grad_fig, big, fig if needs_fig else None)
    return {name: terms[name] for name in names}


def screen_scores(run: RunDir, units: list[Unit], heads: list[tuple[int, int]], images: list[int],
                  names: list[str]) -> dict[str, np.ndarray]:
    """Per head, the screen's estimate of each named score (its mean over D)."""
    return {name: m.mean(axis=1) for name, m in screen_matrices(run, units, heads, images, names).items()}


def screen_ranking(heads: list[tuple[int, int]], estimates: dict[str, np.ndarray]) -> pa.Table:
    """screen.parquet: one row per head (layer, head), and per score S its estimate S and rank S_rank (1 = best)."""
    columns = {"layer": pa.array([l for l, _ in heads], pa.int32()), "head": pa.array([h for _, h in heads], pa.int32())}
    for name, values in estimates.items():
        columns[name] = pa.array(values, pa.float64())
        columns[f"{name}_rank"] = pa.array(ranks(values), pa.int64())
    return pa.table(columns)
