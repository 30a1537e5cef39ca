"""The adaptive scan (config `adaptive`, `scan --adaptive`): the exhaustive scan's top K for a fraction of the
ablated forwards, through the same units, executors and run directory as the exhaustive scan.

Each round of `method.adaptive.AdaptiveTopK` names heads (those still in play) and images of D (the next
images of its seeded visiting order); it becomes ordinary scan units (image shards x layer ranges, holding
only the round's heads) under deltas/adaptive/round-RRR/. The stage runs them on any executor (in this
process or on Ray replicas, with their retries and failure records), their files give the round's terms
(`ranking.score_matrices`), and the state decides. Resume is the same loop: the rounds already on disk are
read back, not run, and give the same values, so the same decisions and the same next round. Nothing in a
round depends on how many replicas ran it or on retries, so neither does the result.

The state is built from D's BIG (and FIG) in the mask stage's files, which bound every head's term per image
(`method.adaptive.term_bounds`). With `adaptive_order: screen`, the gradient pre-screen (screen/, one forward
and backward per view and image) ranks the heads first; its best LEAD_PER_K x K heads lead the first round
(later rounds lead with the heads of the highest running means). The screen only orders the work: every
decision is the bounded one on exact measurements.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import Config
from ..method.adaptive import AdaptiveTopK, Round, for_score
from ..method.fidelity import top
from ..models import scanned_heads
from ..rundir import RunDir, StorageError
from .ranking import score_matrices
from .units import Unit, layer_ranges, missing_units, shards

LEAD_PER_K = 2  # with the screen's order: its best 2K heads lead the first round


def round_folder(index: int) -> str:
    """The folder (under deltas/) of an adaptive round's units."""
    return f"adaptive/round-{index:03d}"


def new_state(cfg: Config, n_heads: int, masks: pa.Table, lead: np.ndarray | None = None) -> AdaptiveTopK:
    """The adaptive scan's state for a run's config (K from top_k, the score's range and per-image bounds from
    the masks of D, by image id, delta, the schedule)."""
    fig = masks["fig"].to_numpy() if "fig" in masks.column_names else None
    return for_score(cfg.score, n_heads, masks.num_rows, cfg.k_of(n_heads), big=masks["big"].to_numpy(), fig=fig,
                     delta=cfg.delta, seed=cfg.seed, first=cfg.adaptive_first, growth=cfg.adaptive_growth, lead=lead)


def lead_heads(estimates: np.ndarray, k: int) -> np.ndarray:
    """The heads the pre-screen ranks best (LEAD_PER_K x K of them; ties to the lower index)."""
    return top(estimates, min(len(estimates), LEAD_PER_K * k))


class AdaptiveScan:
    """One run's adaptive scan: its rounds as units, their values, and the ranking it ends with."""

    def __init__(self, run: RunDir, cfg: Config, selected: list[int], heads_per_layer: list[int],
                 lead: np.ndarray | None = None, skipped: list[int] = ()):
        self.run, self.cfg = run, cfg
        self.selected = sorted(selected)
        self.heads_per_layer = heads_per_layer
        self.heads = scanned_heads(heads_per_layer, skipped)  # skipped layers' heads cannot change the logits
        self.position = {image: i for i, image in enumerate(self.selected)}
        masks = run.read_folder("masks", ["image_id", "big"] + (["fig"] if cfg.measure_fig else []))
        if masks is not None:
            masks = masks.filter(pc.is_in(masks["image_id"], value_set=pa.array(self.selected, pa.int64())))
            masks = masks.sort_by("image_id")
        if masks is None or masks["image_id"].to_pylist() != self.selected:
            raise StorageError(f"{run.url}: masks/ does not hold one row per image of D; the mask stage did not finish")
        self.state = new_state(cfg, len(self.heads), masks, lead)

    def units(self, spec: Round) -> list[list[Unit]]:
        """Per block of the round: image shards (by image id) x layer ranges, each unit with the block's heads in
        its layers and the mask files of its images."""
        out, shard = [], 0
        ranges = layer_ranges(len(self.heads_per_layer), self.cfg.unit_layers)
        for block in spec.blocks:
            heads = [self.heads[i] for i in block.heads]
            ids = sorted(self.selected[j] for j in block.images)
            units = []
            for part in shards(ids, self.cfg.unit_images):
                groups = sorted({self.position[i] // self.cfg.mask_batch for i in part})
                inputs = tuple(Unit("mask", g, ()).file for g in groups)
                for a, b in ranges:
                    mine = tuple(h for h in heads if a <= h[0] < b)
                    if mine:
                        units.append(Unit("scan", shard, part, (a, b), inputs, mine, subdir=round_folder(spec.index)))
                shard += 1
            out.append(units)
        return out

    def values(self, spec: Round, units: list[list[Unit]]) -> list[np.ndarray]:
        """The round's terms of the run's score, per block as (heads, images) in the block's order."""
        return [score_matrices(self.run, block_units, [self.heads[i] for i in block.heads],
                               [self.selected[j] for j in block.images], [self.cfg.score])[self.cfg.score]
                for block, block_units in zip(spec.blocks, units)]

    def rounds(self) -> Iterator[tuple[Round, list[Unit]]]:
        """(round, its units) in turn. The consumer runs the units; the next round is known once they are all
        on disk, so the generator stops at the first round with a unit missing (resume, status)."""
        spec = self.state.next_round()
        while spec is not None:
            units = self.units(spec)
            flat = [u for block in units for u in block]
            yield spec, flat
            if missing_units(self.run, flat):
                return
            spec = self.state.update(self.values(spec, units))

    @property
    def finished(self) -> bool:
        return self.state.finished

    def ranking(self) -> pa.Table:
        """rankings.parquet of an adaptive run, best first: the top K by their means, then the rest by their means
        (an approximate order: those heads were measured on part of D). Per head: score (its estimate from the n
        images it was measured on: the heavy images exactly, the light ones' mean; exact where n = N), its
        stderr, ci_low and ci_high (the confidence sequence's interval the decisions used,
        jointly valid at 1 - delta), n, rank, in_top_k, decided_early (it left the scan before all of D: n < N) and
        decided_round (the round after which its membership was known); the score's own columns (name,
        name_stderr, name_ci_low, name_ci_high, name_rank) repeat them, as in an exhaustive ranking."""
        state = self.state
        res = state.result()
        stderr = res.stderr
        name = self.cfg.score
        columns = {"layer": pa.array([l for l, _ in self.heads], pa.int32()),
                   "head": pa.array([h for _, h in self.heads], pa.int32())}
        stats = {"": res.mean, "_stderr": stderr, "_ci_low": res.ci_low, "_ci_high": res.ci_high}
        columns.update({f"{name}{suffix}": pa.array(v, pa.float64()) for suffix, v in stats.items()})
        columns[f"{name}_rank"] = pa.array(res.rank, pa.int64())
        columns.update({"score": pa.array(res.mean, pa.float64()), "stderr": pa.array(stderr, pa.float64()),
                        "ci_low": pa.array(res.ci_low, pa.float64()), "ci_high": pa.array(res.ci_high, pa.float64()),
                        "n": pa.array(res.n, pa.int64()), "rank": pa.array(res.rank, pa.int64()),
                        "in_top_k": pa.array(res.in_top_k, pa.bool_()),
                        "decided_early": pa.array(res.n < state.n_images, pa.bool_()),
                        "decided_round": pa.array(np.where(res.decided_round < 0, state.round - 1, res.decided_round),
                                                  pa.int64())})
        return pa.table(columns).sort_by("rank")

    def summary(self) -> dict:
        """What adaptive.json records: K, delta, rounds, pairs measured against the exhaustive scan's."""
        s = self.state
        return {"k": s.k, "delta": s.delta, "rounds": s.round, "pairs": int(s.pairs),
                "exhaustive_pairs": int(s.n_heads * s.n_images), "n_images": s.n_images, "heads": s.n_heads,
                "decided_in": int((s.decided == "in").sum()), "decided_out": int((s.decided == "out").sum()),
                "lead": [list(self.heads[i]) for i in s.lead], "heavy": s.heavy,
                "finished": bool(s.finished)}
