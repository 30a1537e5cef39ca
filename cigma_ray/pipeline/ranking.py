"""Ranking: each scan unit's deltas streamed into (heads x images) matrices of score terms, then
every score's mean, standard error, bootstrap interval and rank; iterative rounds merged into one ranking."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import Config
from ..method import head_scores, ranks, score_terms
from ..method.scores import FIG_SCORES, SWAP_SCORES
from ..rundir import RunDir, StorageError
from .units import Unit


def rank_heads(matrices: dict[str, np.ndarray], heads: list[tuple[int, int]], cfg: Config) -> pa.Table:
    """One row per head, best first. Every score in `matrices` gets its columns (name, name_stderr,
    name_ci_low, name_ci_high, name_rank); score, stderr, ci_low, ci_high, n and rank are those of the
    config's `score`."""
    columns = {"layer": pa.array([l for l, _ in heads], pa.int32()),
               "head": pa.array([h for _, h in heads], pa.int32())}
    for name, matrix in matrices.items():
        stats = head_scores(matrix, bootstrap=cfg.bootstrap, ci_level=cfg.ci_level, seed=cfg.seed)
        if name == cfg.score:
            chosen = stats
        columns[name] = pa.array(stats["score"], pa.float64())
        columns.update({f"{name}_{k}": pa.array(stats[k], pa.float64()) for k in ("stderr", "ci_low", "ci_high")})
        columns[f"{name}_rank"] = pa.array(ranks(stats["score"]), pa.int64())
    table = pa.table({**columns, **{k: pa.array(chosen[k], pa.float64()) for k in ("score", "stderr", "ci_low", "ci_high")},
                      "n": pa.array(chosen["n"], pa.int64())})
    return table.append_column("rank", pa.array(ranks(table["score"].to_numpy()), pa.int64())).sort_by("rank")


def merge_rounds(rounds: list[pa.Table], k_per_round: int, score: str = "big_drop") -> pa.Table:
    """One ranking: each round's removed heads in the order they were removed, then the last round's
    ranking of the heads left; `round` says which round's scan each row's score comes from.

    One notion of rank: `rank` and `{score}_rank` (the run's score) are both the position in that order, so
    every command removes the same heads; the other scores' ranks are per round and not comparable across
    rounds, so they are left empty (their values stay, each from its round)."""
    parts = [t.slice(0, k_per_round) for t in rounds[:-1]] + [rounds[-1]]
    merged = pa.concat_tables([t.append_column("round", pa.array(np.full(t.num_rows, r), pa.int32()))
                               for r, t in enumerate(parts)])
    order = pa.array(np.arange(1, merged.num_rows + 1), pa.int64())
    for name in merged.column_names:
        if name == "rank" or name == f"{score}_rank":
            merged = merged.set_column(merged.schema.get_field_index(name), name, order)
        elif name.endswith("_rank") and len(rounds) > 1:
            merged = merged.set_column(merged.schema.get_field_index(name), name, pa.nulls(merged.num_rows, pa.int64()))
    return merged


def score_matrices(run: RunDir, units: list[Unit], heads: list[tuple[int, int]], images: list[int],
                   names: list[str]) -> dict[str, np.ndarray]:
    """(heads, images) matrices of the named scores' terms (`method.score_terms`), read from each scan
    unit's file in turn; every cell must be filled exactly once."""
    head_index = np.full((max(l for l, _ in heads) + 1, max(h for _, h in heads) + 1), -1, dtype=np.int64)
    for i, (layer, head) in enumerate(heads):
        head_index[layer, head] = i
    ids = np.asarray(images, dtype=np.int64)
    by_id = np.argsort(ids, kind="stable")
    matrices = {name: np.full((len(heads), len(images)), np.nan) for name in names}
    filled = np.zeros((len(heads), len(images)), dtype=np.int32)
    needs_fig = any(name in FIG_SCORES for name in names)
    needs_swap = any(name in SWAP_SCORES for name in names)
    columns = (["image_id", "layer", "head", "big", "big_ablated"] + (["fig", "fig_ablated"] if needs_fig else [])
               + (["swap", "swap_ablated"] if needs_swap else []))
    for unit in units:
        t = run.read_table(unit.file, columns)
        layer, head, image = (t[k].to_numpy().astype(np.int64) for k in ("layer", "head", "image_id"))
        pos = np.minimum(np.searchsorted(ids, image, sorter=by_id), len(ids) - 1)
        c = by_id[pos]
        known_head = (layer < head_index.shape[0]) & (head < head_index.shape[1])
        r = np.where(known_head, head_index[np.where(known_head, layer, 0), np.where(known_head, head, 0)], -1)
        if (r < 0).any() or (ids[c] != image).any():
            raise StorageError(f"{run.url}: {unit.file} holds a head or image this run does not scan: remove the "
                               "run's deltas/ folder and scan again")
        terms = score_terms(**{k: t[k].to_numpy() for k in columns[3:]})
        for name in names:
            matrices[name][r, c] = terms[name]
        np.add.at(filled, (r, c), 1)
    if (filled != 1).any():
        bad = int((filled != 1).sum())
        raise StorageError(f"{run.url}: deltas/ does not hold each of {len(heads)} heads once per each of "
                           f"{len(images)} images ({bad} cells missing or repeated): remove the run's deltas/ folder "
                           "and scan again")
    return matrices
