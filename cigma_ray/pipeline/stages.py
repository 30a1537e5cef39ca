"""The stages predict -> select -> mask (with gains) -> [means] -> scan -> rank, and resume.

`Pipeline` validates everything a scan needs up front (data, model, config, the run directory's
compatibility), then runs each stage's missing units on its executor: in this process by
default, or on Ray replicas (distributed/). A stage that finds its outputs complete skips.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import replace
from typing import Callable

import numpy as np
import pyarrow as pa

from ..config import Config, ConfigError, resolve_k
from ..data import DataError, open_source
from ..method import available_scores
from ..models import load, scanned_heads, spec_with_classes
from ..progress import progress_bar
from ..rundir import RunDir, StorageError, build_manifest, check_compatible, check_out
from .adaptive import AdaptiveScan, lead_heads
from .executor import LocalExecutor, UnitsFailed
from .ranking import merge_rounds, rank_heads, score_matrices
from .screen import screen_scores, screen_units
from .units import (
    Job,
    Unit,
    check_units,
    donors_of,
    mask_units,
    means_units,
    missing_units,
    predict_units,
    round_file,
    scan_rounds,
    scan_units,
    select_images,
)
from .worker import Worker, failure_table


class Pipeline:
    """A run directory being filled: validates everything up front, then runs missing units."""

    def __init__(self, job: Job, progress: bool = True, executor=None, load_device: str | None = None):
        self.cfg = job.config
        self.progress = progress
        check_out(job.out, [job.data])  # before anything is read or written
        self.run = RunDir(job.out)
        self.run.check()  # the bucket and the credentials, before the model loads
        self.source = open_source(job.data)
        job = self.job = replace(job, model=spec_with_classes(job.model, self.source.classes))  # hf: the data's class names
        self.loaded = load(job.model, load_device or job.device, job.precision)
        self.source.check_classes(self.loaded.num_classes, job.model.name)
        self.adapter = self.loaded.adapter
        scanned = len(self.adapter.scanned_heads)  # heads of skipped layers cannot change the logits
        if (self.cfg.rounds - 1) * self.cfg.k_per_round >= scanned:
            raise ConfigError(f"rounds={self.cfg.rounds} with k_per_round={self.cfg.k_per_round} would remove "
                              f"{(self.cfg.rounds - 1) * self.cfg.k_per_round} of the {scanned} heads the scan "
                              "measures before its last round; lower one of them")
        resolve_k(self.cfg.top_k, scanned)  # a top_k larger than the model is an error now, not later
        self._worker: Worker | None = None
        self.executor = executor or LocalExecutor(lambda: self.worker, self.cfg.max_attempts)
        self.manifest = build_manifest(self.cfg, self.loaded.fingerprint, self.adapter.heads_per_layer, job.data,
                                       self.source.fingerprint(), len(self.source), self.source.classes, job.precision,
                                       self.adapter.skipped_layers)
        check_compatible(self.run, self.manifest, job.out)

    @property
    def worker(self) -> Worker:
        """This process's replica (in-process runs, and evaluations on the scanned model)."""
        if self._worker is None:
            self._worker = Worker(self.job, self.loaded, self.source)
        return self._worker

    # -- units ------------------------------------------------------------------------------
    def predict_units(self) -> list[Unit]:
        return predict_units(len(self.source), self.cfg)

    def selected(self) -> list[int]:
        preds = self.run.read_folder("predictions", columns=["image_id", "correct"])
        correct = preds.filter(preds["correct"])["image_id"].to_pylist()
        if not correct:
            raise DataError(f"none of the {preds.num_rows} readable images of {self.job.data} is classified correctly by "
                            f"{self.job.model.name}; check --checkpoint, --num-classes and that class folders follow "
                            "the model's class order")
        return select_images(correct, self.cfg.tp_ratio, self.cfg.seed)

    def mask_units(self, selected: list[int]) -> list[Unit]:
        """The mask stage's units; with measure_swap each carries its images' donors (drawn from predictions)."""
        donors = donors_of(self.run, selected, self.cfg) if self.cfg.measure_swap else None
        return mask_units(selected, self.cfg, donors)

    def means_units(self, selected: list[int]) -> list[Unit]:
        return means_units(selected, self.cfg)

    def scan_units(self, selected: list[int], round: int = 0, removed: list[tuple[int, int]] = ()) -> list[Unit]:
        return scan_units(selected, self.cfg, self.adapter.heads_per_layer, round, removed,
                          sorted(self.adapter.skipped_layers))

    # -- stages ---------------------------------------------------------------------------
    def run_stage(self, name: str, units: list[Unit], work_of: Callable[[Unit], int], unit_name: str) -> None:
        """Run the stage's missing units on the executor, with a progress bar of work done (images or
        pairs), units done and retries."""
        todo, damaged = check_units(self.run, units, adopt=True)
        if damaged:
            print(f"{name}: redoing {len(damaged)} damaged unit file(s): "
                  + "; ".join(f"{f} ({why})" for f, why in list(damaged.items())[:5])
                  + (f"; ... and {len(damaged) - 5} more" if len(damaged) > 5 else ""), file=sys.stderr)
        if not todo:
            return
        total = sum(work_of(u) for u in units)
        state = {"done": len(units) - len(todo), "retries": 0}
        shown: dict[str, int] = defaultdict(int)  # work of a running unit already on the bar
        with progress_bar(name, total, total - sum(work_of(u) for u in todo), unit_name, self.progress) as bar:
            def status() -> None:
                retries = f", {state['retries']} retries" if state["retries"] else ""
                bar.set_postfix_str(f"units {state['done']}/{len(units)}{retries}")

            def progress(unit: Unit, n: int) -> None:
                shown[unit.file] += n
                bar.update(n)

            def done(unit: Unit, receipt: dict) -> None:
                state["done"] += 1
                bar.update(work_of(unit) - shown.pop(unit.file, 0))
                self.run.remove(unit.failure_record)  # a unit given up on earlier has now succeeded
                status()

            def retry(unit: Unit, error: str) -> None:
                state["retries"] += 1
                bar.update(-shown.pop(unit.file, 0))  # its work starts again
                status()

            status()
            failures = self.executor.run(todo, done, retry, progress)
        if failures:
            for f in failures:
                self.run.write_table(f.unit.failure_record, failure_table(
                    [dict(kind="unit", unit=f.unit.file, stage=f.unit.stage, attempts=f.attempts, error=f.error)]))
            raise UnitsFailed(failures)

    def prepare(self) -> list[int]:
        """The stages before any ablation: predict, D, its masks and (ablation: mean) the heads' means; returns D."""
        self.run_stage("predict", self.predict_units(), lambda u: len(u.image_ids), "img")
        selected = self.selected()
        self.run_stage("mask", self.mask_units(selected), lambda u: len(u.image_ids) * max(1, self.cfg.mask_steps),
                       "img-step")  # ticks once per optimisation step of a unit's images
        if self.cfg.ablation == "mean":  # the heads' means over D, on the intact model, before any ablation
            self.run_stage("means", self.means_units(selected), lambda u: len(u.image_ids), "img")
        return selected

    def run_all(self, executor=None) -> None:
        """Every stage in order, on `executor` (a Ray executor, say) or this pipeline's own; each stage skips
        what is already on disk."""
        own, self.executor = self.executor, executor or self.executor
        try:
            if not self.run.exists("run.json"):
                self.run.write_json("run.json", self.manifest)
            selected = self.prepare()
            if self.cfg.adaptive:
                self.run_adaptive(selected)
                return
            rounds = []
            for r, removed, units in scan_rounds(self.run, self.cfg, selected, self.adapter.heads_per_layer,
                                                 sorted(self.adapter.skipped_layers)):
                self.run_stage("scan" if self.cfg.rounds == 1 else f"scan r{r}", units,
                               lambda u: len(u.image_ids) * len(u.heads), "pair")
                rounds.append(self.rank_round(selected, r, removed))
            self.run.write_table("rankings.parquet", merge_rounds(rounds, self.cfg.k_per_round, self.cfg.score))
        finally:
            self.executor = own

    def screen(self, selected: list[int]) -> dict[str, np.ndarray]:
        """The gradient pre-screen of D (screen/, skipped where done): per score the run has, each scanned head's
        estimate (in adapter.scanned_heads' order)."""
        units = screen_units(selected, self.cfg)
        self.run_stage("screen", units, lambda u: len(u.image_ids), "img")
        names = available_scores(self.cfg.measure_fig)  # the screen has no background-swap view
        return screen_scores(self.run, units, self.adapter.scanned_heads, sorted(selected), names)

    def run_adaptive(self, selected: list[int]) -> None:
        """The adaptive scan (pipeline/adaptive.py): its rounds' units on this pipeline's executor, then
        adaptive.json and rankings.parquet. With adaptive_order: screen, the pre-screen runs first."""
        lead = None
        if self.cfg.adaptive_order == "screen":
            lead = lead_heads(self.screen(selected)[self.cfg.score], self.cfg.k_of(len(self.adapter.scanned_heads)))
        scan = AdaptiveScan(self.run, self.cfg, selected, self.adapter.heads_per_layer, lead,
                            sorted(self.adapter.skipped_layers))
        for spec, units in scan.rounds():
            self.run_stage(f"adaptive r{spec.index}", units, lambda u: len(u.image_ids) * len(u.heads), "pair")
        self.run.write_json("adaptive.json", scan.summary())
        self.run.write_table("rankings.parquet", scan.ranking())

    def rank_round(self, selected: list[int], round: int = 0, removed: list[tuple[int, int]] = ()) -> pa.Table:
        """Score one round's heads from its deltas, one unit file at a time, best first (`rank_heads`).

        The driver holds one (heads x images) matrix per score, as the bootstrap needs, never the rows
        of the whole data set at once. Rounds of an iterative run are kept in rounds/.
        """
        units = self.scan_units(selected, round, removed)
        missing = missing_units(self.run, units, verify=False)  # the scan stage has just verified them
        if missing:
            raise StorageError(f"cannot rank {self.run.url}: {len(missing)} scan units are missing, e.g. "
                               f"{missing[0].file}")
        heads = [h for h in self.adapter.scanned_heads if h not in set(removed)]
        names = available_scores(self.cfg.measure_fig, self.cfg.measure_swap)
        table = rank_heads(score_matrices(self.run, units, heads, sorted(selected), names), heads, self.cfg)
        if self.cfg.rounds > 1:
            self.run.write_table(round_file(round), table)
        return table


def run_status(run: RunDir) -> dict:
    """What a run has finished, what it still misses and what failed, from its files alone."""
    meta = run.read_json("run.json")
    cfg = Config(**meta["config"])
    plan = meta["plan"]
    stages, damaged = {}, {}
    adaptive = None

    def count(name: str, units: list[Unit]) -> None:
        todo, bad = check_units(run, units)  # every file read whole and checked against its receipt
        stages[name] = (len(units) - len(todo), len(units))
        damaged.update(bad)

    count("predict", predict_units(plan["n_images"], cfg))
    if stages["predict"][0] == stages["predict"][1]:
        preds = run.read_folder("predictions", columns=["image_id", "correct"])
        correct = preds.filter(preds["correct"])["image_id"].to_pylist()
        selected = select_images(correct, cfg.tp_ratio, cfg.seed) if correct else []
        stages_units = [("mask", mask_units(selected, cfg))]
        if cfg.ablation == "mean":
            stages_units.append(("means", means_units(selected, cfg)))
        if cfg.adaptive:
            adaptive = adaptive_status(run, cfg, selected, plan["heads_per_layer"], plan.get("skipped_layers", []),
                                       stages_units)
        else:
            stages_units += [("scan" if r == 0 else f"scan round {r}", units)
                             for r, _, units in scan_rounds(run, cfg, selected, plan["heads_per_layer"],
                                                            plan.get("skipped_layers", ()))]
        for name, units in stages_units:
            count(name, units)
    failures = run.read_folder("failures")
    return {"meta": meta, "stages": stages, "ranked": run.exists("rankings.parquet"), "damaged": damaged,
            "failures": failures.to_pylist() if failures is not None else [], "adaptive": adaptive}


def adaptive_status(run: RunDir, cfg: Config, selected: list[int], heads_per_layer: list[int],
                    skipped: list[int], stages_units: list) -> dict | None:
    """An adaptive run's screen and rounds so far (appended to `stages_units`; the rounds are replayed from
    their files, as a resumed scan would), and its state: rounds done, pairs measured, heads decided."""
    if not selected or missing_units(run, mask_units(selected, cfg)):
        return None
    lead = None
    if cfg.adaptive_order == "screen":
        units = screen_units(selected, cfg)
        stages_units.append(("screen", units))
        if missing_units(run, units):
            return None
        heads = scanned_heads(heads_per_layer, skipped)
        estimates = screen_scores(run, units, heads, sorted(selected), [cfg.score])[cfg.score]
        lead = lead_heads(estimates, cfg.k_of(len(heads)))
    scan = AdaptiveScan(run, cfg, selected, heads_per_layer, lead, skipped)
    for spec, units in scan.rounds():
        stages_units.append((f"adaptive round {spec.index}", units))
    return scan.summary()

