"""What a scan is (Job) and the units its stages are cut into, deterministic from the config and the
data listing, so every process (driver, replica, resume) agrees on them.

A unit writes exactly one Parquet file whose name derives from the unit; a stage runs only the
units whose file is missing, so an interrupted run finishes when the same command runs again.
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..config import Config, from_dict
from ..method import choose_donors
from ..models import ModelSpec
from ..rundir import RunDir, scanned_model_spec


@dataclass(frozen=True)
class Job:
    """Everything that defines a scan; every process rebuilds its model and data from this."""

    model: ModelSpec
    data: str
    out: str
    config: Config = field(default_factory=Config)
    device: str = "cpu"
    precision: str = "fp32"

    @classmethod
    def of_run(cls, meta: dict, url: str, device: str = "cpu", checkpoint: str | None = None) -> "Job":
        """The Job that made a run, read back from its run.json."""
        return cls(model=scanned_model_spec(meta, checkpoint), data=meta["data"]["url"], out=url,
                   config=from_dict(meta["config"], source=f"{url}/run.json"), device=device,
                   precision=meta["precision"])


@dataclass(frozen=True)
class Unit:
    """One piece of a stage: an image shard, and for the scan a layer range [first, stop)."""

    stage: str
    shard: int
    image_ids: tuple[int, ...]
    layers: tuple[int, int] | None = None
    inputs: tuple[str, ...] = ()  # run-directory files the unit reads (a scan unit's masks)
    heads: tuple[tuple[int, int], ...] = ()  # a scan unit's heads
    round: int = 0  # iterative mode: the scan round
    removed: tuple[tuple[int, int], ...] = ()  # heads removed by earlier rounds, ablated throughout
    subdir: str = ""  # a folder of the stage's own (an adaptive scan's round: "adaptive/round-003")
    donors: tuple[int, ...] = ()  # a mask unit with measure_swap: each image's donor (an image id of D)

    @property
    def file(self) -> str:
        folder = {"predict": "predictions", "mask": "masks", "scan": "deltas", "screen": "screen",
                  "means": "means"}[self.stage]
        if self.subdir:
            folder += f"/{self.subdir}"
        if self.round:
            folder += f"/round-{self.round:02d}"
        name = f"part-{self.shard:05d}"
        if self.layers is not None:
            name += f"-l{self.layers[0]:03d}-{self.layers[1]:03d}"
        return f"{folder}/{name}.parquet"

    @property
    def failure_file(self) -> str:
        """Images of this unit that could not be read."""
        return f"failures/{self.file.replace('/', '-')}"

    @property
    def failure_record(self) -> str:
        """This unit, when it failed for good."""
        return f"failures/unit-{self.file.replace('/', '-')}"


log = logging.getLogger(__name__)
NO_DONOR = -1  # masks/ donor of an image with no image of another predicted class in D: it is its own donor


def shards(ids: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i: i + size]) for i in range(0, len(ids), size)]


def layer_ranges(num_layers: int, per_unit: int) -> list[tuple[int, int]]:
    per_unit = per_unit or num_layers
    return [(a, min(a + per_unit, num_layers)) for a in range(0, num_layers, per_unit)]


def select_images(correct_ids: Iterable[int], tp_ratio: float, seed: int) -> list[int]:
    """D: a seeded uniform sample of round(tp_ratio * n) correctly classified images (at least one)."""
    ids = np.array(sorted(correct_ids), dtype=np.int64)
    k = max(1, round(tp_ratio * len(ids))) if len(ids) else 0
    chosen = np.random.default_rng(seed).choice(ids, size=k, replace=False) if k else ids
    return sorted(int(i) for i in chosen)


def predict_units(n_images: int, cfg: Config) -> list[Unit]:
    return [Unit("predict", k, s) for k, s in enumerate(shards(list(range(n_images)), cfg.unit_images))]


def mask_units(selected: list[int], cfg: Config, donors: dict[int, int] | None = None) -> list[Unit]:
    """One unit per mask batch: masks optimised together must always be the same images. With `donors`
    (measure_swap), each unit carries its images' donors, whatever shard those live in."""
    return [Unit("mask", k, s, donors=tuple(donors[i] for i in s) if donors else ())
            for k, s in enumerate(shards(selected, cfg.mask_batch))]


def donors_of(run: RunDir, selected: list[int], cfg: Config) -> dict[int, int]:
    """Each image of D's donor for the background swap: an image of D with another predicted class, drawn
    seeded (`method.choose_donors` over D in image-id order), so every process agrees on it."""
    preds = run.read_folder("predictions", columns=["image_id", "pred"])
    pred_of = dict(zip(preds["image_id"].to_pylist(), preds["pred"].to_pylist()))
    ids = sorted(selected)
    donors = choose_donors([pred_of[i] for i in ids], cfg.seed)[:, 0]
    if len(ids) and (donors < 0).any():
        log.warning("measure_swap: every image of D is predicted as class %s, so no image has a donor of another "
                    "class for the background swap; its donor is itself (recorded as -1), SWAP is 0 and swap_drop "
                    "is 0 for every head. Scan data the model tells apart in several classes for a swap score.",
                    pred_of[ids[0]])
    return {i: ids[d] if d >= 0 else NO_DONOR for i, d in zip(ids, donors)}


def means_units(selected: list[int], cfg: Config) -> list[Unit]:
    """ablation: mean: image shards of D whose heads' output sums (over images and tokens) make the means."""
    return [Unit("means", k, s) for k, s in enumerate(shards(selected, cfg.unit_images))]


def scan_units(selected: list[int], cfg: Config, heads_per_layer: list[int], round: int = 0,
               removed: list[tuple[int, int]] = (), skipped: Iterable[int] = ()) -> list[Unit]:
    """Image shards x layer ranges; each unit names the mask files that hold its images. The heads of
    `skipped` layers (run.json's plan.skipped_layers: heads that cannot change the logits) are in no unit."""
    size, batch = cfg.unit_images, cfg.mask_batch
    gone = set(removed) | {(l, h) for l in skipped for h in range(heads_per_layer[l])}
    units = []
    for k, ids in enumerate(shards(selected, size)):
        first, last = k * size // batch, (k * size + len(ids) - 1) // batch
        inputs = tuple(Unit("mask", g, ()).file for g in range(first, last + 1))
        for a, b in layer_ranges(len(heads_per_layer), cfg.unit_layers):
            heads = tuple((l, h) for l in range(a, b) for h in range(heads_per_layer[l]) if (l, h) not in gone)
            if heads:
                units.append(Unit("scan", k, ids, (a, b), inputs, heads, round, tuple(removed)))
    return units


def round_file(round: int) -> str:
    """An iterative run's ranking of one round (the heads removed after it are its first k_per_round)."""
    return f"rounds/round-{round:02d}.parquet"


def scan_rounds(run: RunDir, cfg: Config, selected: list[int], heads_per_layer: list[int], skipped: Iterable[int] = ()):
    """(round, heads removed before it, its units) of each scan round in turn. A round after the first
    is known once the round before it is ranked (rounds/round-XX.parquet), so the generator stops at
    the first round whose predecessor has no ranking yet: rank each round before asking for the next."""
    removed: list[tuple[int, int]] = []
    for r in range(cfg.rounds):
        yield r, list(removed), scan_units(selected, cfg, heads_per_layer, r, removed, skipped)
        if r + 1 < cfg.rounds:
            if not run.exists(round_file(r)):
                return
            best = run.read_table(round_file(r)).slice(0, cfg.k_per_round).to_pylist()
            removed += [(row["layer"], row["head"]) for row in best]


def check_units(run: RunDir, units: list[Unit], verify: bool = True,
                adopt: bool = False) -> tuple[list[Unit], dict[str, str]]:
    """(the units still to do, {file: why} of those among them whose file is there but damaged).

    A unit is done when its file exists and, with `verify`, matches the sha256 of its receipt (each file is
    read whole; `RunDir.check_units`). Without `verify` only names are listed (right after a stage that
    verified them)."""
    present = set()
    for folder in {posixpath.dirname(u.file) for u in units}:
        present |= {f"{folder}/{n}" for n in run.list(folder)}
    damaged = run.check_units([u.file for u in units if u.file in present], adopt) if verify else {}
    return [u for u in units if u.file not in present or u.file in damaged], damaged


def missing_units(run: RunDir, units: list[Unit], verify: bool = True) -> list[Unit]:
    """The units whose file the run directory does not hold yet, or holds damaged."""
    return check_units(run, units, verify)[0]
