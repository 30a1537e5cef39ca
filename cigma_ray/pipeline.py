"""The stages predict -> select -> mask (with gains) -> scan -> rank, their units, and resume.

Every expensive stage is cut into units that are deterministic from the config and the data
listing; a unit writes exactly one Parquet file whose name derives from the unit. A stage runs
only the units whose file is missing, so an interrupted run finishes when the same command runs
again. `Worker.run_unit` is all a replica needs to do a unit, in this process or on a Ray actor.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import __version__
from .config import Config, ConfigError, resolve_k
from .data import DataError, ImageSource, open_source
from .engine import Replica
from .method import SCORES, head_scores, ranks, score_terms
from .models import LoadedModel, ModelError, ModelSpec, load, spec_from_options, spec_with_classes
from .storage import RunDir


class RunMismatch(ValueError):
    """An existing run directory was made with settings that would change its results."""


@dataclass(frozen=True)
class Job:
    """Everything that defines a scan; every process rebuilds its model and data from this."""

    model: ModelSpec
    data: str
    out: str
    config: Config = field(default_factory=Config)
    device: str = "cpu"
    precision: str = "fp32"


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

    @property
    def file(self) -> str:
        folder = {"predict": "predictions", "mask": "masks", "scan": "deltas"}[self.stage]
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


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


class Worker:
    """A model replica bound to a run: reads a unit's inputs, computes, writes the unit's file."""

    def __init__(self, job: Job, loaded: LoadedModel | None = None, source: ImageSource | None = None):
        self.job = job
        self.cfg = job.config
        self.run = RunDir(job.out)
        self.source = source or open_source(job.data)
        self.loaded = loaded or load(job.model, job.device, job.precision)
        self.replica = Replica(self.loaded, job.device, job.precision, self.cfg.batch_size)

    def _images(self, unit: Unit):
        records = [self.source.records[i] for i in unit.image_ids]
        images, ok, failed = self.source.load(records, self.loaded.transform)
        if failed:
            self.run.write_table(unit.failure_file, failure_table(
                [dict(kind="image", unit=unit.file, image_id=r.image_id, path=r.path, stage=unit.stage, error=e)
                 for r, e in failed]))
        return images, ok

    def run_unit(self, unit: Unit, on_progress: Callable[[int], None] | None = None) -> dict:
        """Do one unit and write its file; returns a small receipt (never tensors or rows)."""
        start = time.perf_counter()
        table = getattr(self, f"_{unit.stage}")(unit, on_progress or (lambda n: None))
        checksum = self.run.write_table(unit.file, table)
        return {"file": unit.file, "rows": table.num_rows, "sha256": checksum, "seconds": time.perf_counter() - start}

    def _predict(self, unit: Unit, progress) -> pa.Table:
        images, ok = self._images(unit)
        probs = (torch.softmax(self.replica.logits(images) / self.cfg.tau, dim=1) if ok
                 else torch.empty(0, self.loaded.num_classes))
        labels = np.array([r.label for r in ok], dtype=np.int64)
        pred = probs.argmax(dim=1).numpy()
        progress(len(unit.image_ids))
        return pa.table({
            "image_id": pa.array([r.image_id for r in ok], pa.int64()),
            "path": [r.path for r in ok],
            "label": pa.array(labels, pa.int64()),
            "pred": pa.array(pred, pa.int64()),
            "correct": pa.array(pred == labels, pa.bool_()),
            "probs": pa.array(list(probs.numpy().astype(np.float32)), pa.list_(pa.float32())),
        })

    def _mask(self, unit: Unit, progress) -> pa.Table:
        images, ok = self._images(unit)
        if not ok:
            return empty_masks_table()
        result = self.replica.masks(images, self.cfg)
        progress(len(unit.image_ids))
        return pa.table({
            "image_id": pa.array([r.image_id for r in ok], pa.int64()),
            "mask": pa.array(list(result.mask.reshape(len(ok), -1).numpy()), pa.list_(pa.float32())),
            "fg": pa.array(list(result.fg.reshape(len(ok), -1).numpy()), pa.list_(pa.bool_())),
            "fig": pa.array(result.fig.numpy(), pa.float64()),
            "big": pa.array(result.big.numpy(), pa.float64()),
            "bir": pa.array(result.bir.numpy(), pa.float64()),
        })

    def _scan(self, unit: Unit, progress) -> pa.Table:
        masks = pa.concat_tables([self.run.read_table(f, ["image_id", "fg", "fig", "big"]) for f in unit.inputs])
        wanted = pa.array(unit.image_ids, pa.int64())
        masks = masks.filter(pc.is_in(masks["image_id"], value_set=wanted)).sort_by("image_id")
        ids = masks["image_id"].to_pylist()
        images, ok = self._images(Unit("scan", unit.shard, tuple(ids), unit.layers))
        if len(ok) != len(ids):  # an image that was readable before is not now: keep the rows aligned
            keep = {r.image_id for r in ok}
            masks = masks.filter(pa.array([i in keep for i in ids]))
            ids = [i for i in ids if i in keep]
        if not ids:
            return empty_deltas_table(self.cfg.measure_fig)
        side = self.cfg.mask_size
        fg = torch.from_numpy(np.stack(masks["fg"].to_numpy(zero_copy_only=False))).reshape(len(ids), side, side)
        heads = list(unit.heads)
        ablated = self.replica.scan(images, fg, heads, self.cfg.tau, on_pairs=progress, removed=unit.removed,
                                    measure_fig=self.cfg.measure_fig)
        fig, big = masks["fig"].to_numpy(), masks["big"].to_numpy()
        if unit.removed:  # the baseline is the model as earlier rounds left it
            fig, big, _ = self.replica.gains(images, fg, self.cfg.tau, self.replica.keep_without(list(unit.removed)))
            fig, big = fig.numpy().astype(np.float64), big.numpy().astype(np.float64)
        n = len(ids)
        big_ablated = ablated.big.numpy().astype(np.float64)
        columns = {
            "image_id": pa.array(np.tile(np.array(ids, dtype=np.int64), len(heads)), pa.int64()),
            "layer": pa.array(np.repeat([l for l, _ in heads], n), pa.int32()),
            "head": pa.array(np.repeat([h for _, h in heads], n), pa.int32()),
            "big": pa.array(np.tile(big, len(heads)), pa.float64()),
            "big_ablated": pa.array(big_ablated.reshape(-1), pa.float64()),
            "delta": pa.array((big[None, :] - big_ablated).reshape(-1), pa.float64()),
        }
        if ablated.fig is not None:
            columns["fig"] = pa.array(np.tile(fig, len(heads)), pa.float64())
            columns["fig_ablated"] = pa.array(ablated.fig.numpy().astype(np.float64).reshape(-1), pa.float64())
        return pa.table(columns)


FAILURE_SCHEMA = pa.schema([("kind", pa.string()), ("unit", pa.string()), ("stage", pa.string()),
                            ("image_id", pa.int64()), ("path", pa.string()), ("attempts", pa.int64()),
                            ("error", pa.string())])


def failure_table(rows: list[dict]) -> pa.Table:
    """failures/ rows: kind "image" (unreadable, skipped) or "unit" (failed max_attempts times)."""
    return pa.Table.from_pylist([{k: r.get(k) for k in FAILURE_SCHEMA.names} for r in rows], schema=FAILURE_SCHEMA)


def empty_masks_table() -> pa.Table:
    return pa.table({"image_id": pa.array([], pa.int64()), "mask": pa.array([], pa.list_(pa.float32())),
                     "fg": pa.array([], pa.list_(pa.bool_())), "fig": pa.array([], pa.float64()),
                     "big": pa.array([], pa.float64()), "bir": pa.array([], pa.float64())})


def empty_deltas_table(measure_fig: bool = False) -> pa.Table:
    names = ["big", "big_ablated", "delta"] + (["fig", "fig_ablated"] if measure_fig else [])
    return pa.table({"image_id": pa.array([], pa.int64()), "layer": pa.array([], pa.int32()),
                     "head": pa.array([], pa.int32()), **{k: pa.array([], pa.float64()) for k in names}})


class Pipeline:
    """A run directory being filled: validates everything up front, then runs missing units."""

    def __init__(self, job: Job, progress: bool = True, executor=None, load_device: str | None = None):
        self.job = job
        self.cfg = job.config
        self.progress = progress
        self.executor = executor  # None: units run in this process
        self.source = open_source(job.data)
        job = self.job = replace(job, model=spec_with_classes(job.model, self.source.classes))  # hf: the data's class names
        self.loaded = load(job.model, load_device or job.device, job.precision)
        self.source.check_classes(self.loaded.num_classes, job.model.name)
        self.run = RunDir(job.out)
        self.adapter = self.loaded.adapter
        if (self.cfg.rounds - 1) * self.cfg.k_per_round >= len(self.adapter.heads):
            raise ConfigError(f"rounds={self.cfg.rounds} with k_per_round={self.cfg.k_per_round} would remove "
                              f"{(self.cfg.rounds - 1) * self.cfg.k_per_round} of the {len(self.adapter.heads)} heads "
                              "of the model before its last round; lower one of them")
        resolve_k(self.cfg.top_k, len(self.adapter.heads))  # a top_k larger than the model is an error now, not later
        self._worker: Worker | None = None
        self.run.check()
        self.manifest = self._manifest()
        self._check_compatible()

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            self._worker = Worker(self.job, self.loaded, self.source)
        return self._worker

    # -- run.json and compatibility ---------------------------------------------------------
    def _manifest(self) -> dict:
        fp = self.loaded.fingerprint
        plan = {"unit_images": self.cfg.unit_images, "unit_layers": self.cfg.unit_layers,
                "n_images": len(self.source), "heads_per_layer": self.adapter.heads_per_layer}
        return {
            "version": __version__,
            "config": self.cfg.to_dict(),
            "model": {**{k: fp[k] for k in ("name", "model_kwargs", "img_size", "num_classes", "input_size", "weights", "checkpoint")},
                      "options": fp.get("options"), "layer_labels": fp.get("layer_labels")},  # hf: models only
            "data": {"url": self.job.data, "fingerprint": self.source.fingerprint(), "n_images": len(self.source),
                     "classes": self.source.classes},
            "precision": self.job.precision,
            "plan": {**plan, "hash": plan_hash(plan)},
        }

    def _check_compatible(self) -> None:
        if not self.run.exists("run.json"):
            return
        old, new = self.run.read_json("run.json"), self.manifest
        diffs = [f"{k}: run has {old['config'].get(k)!r}, this command {new['config'][k]!r}"
                 for k in Config.RESULT_KEYS if old["config"].get(k) != new["config"][k]]
        for key in ("name", "model_kwargs", "num_classes", "input_size", "weights", "options"):
            if old["model"].get(key) != new["model"][key]:
                diffs.append(f"model {key}: run has {old['model'].get(key)!r}, this command {new['model'][key]!r}")
        if old["data"]["fingerprint"] != new["data"]["fingerprint"]:
            diffs.append(f"data: the image listing of {new['data']['url']} differs from the one the run used ({old['data']['url']})")
        if old["precision"] != new["precision"]:
            diffs.append(f"precision: run has {old['precision']}, this command {new['precision']}")
        if old["plan"]["hash"] != new["plan"]["hash"]:
            diffs.append(f"units: run has unit_images={old['plan']['unit_images']}, unit_layers={old['plan']['unit_layers']}")
        if diffs:
            raise RunMismatch(f"--out {self.job.out} already holds a run with other settings:\n  " + "\n  ".join(diffs)
                              + "\nuse a new --out, or the same model, data and config to resume it")

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
        return mask_units(selected, self.cfg)

    def scan_units(self, selected: list[int], round: int = 0, removed: list[tuple[int, int]] = ()) -> list[Unit]:
        return scan_units(selected, self.cfg, self.adapter.heads_per_layer, round, removed)

    def missing(self, units: list[Unit]) -> list[Unit]:
        return missing_units(self.run, units)

    # -- stages ---------------------------------------------------------------------------
    def run_stage(self, name: str, units: list[Unit], work_of: Callable[[Unit], int], unit_name: str) -> None:
        """Run the stage's missing units, here or on the executor's replicas, with a progress bar."""
        todo = self.missing(units)
        if not todo:
            return
        total = sum(work_of(u) for u in units)
        state = {"done": len(units) - len(todo), "retries": 0}
        with progress_bar(name, total, total - sum(work_of(u) for u in todo), unit_name, self.progress) as bar:
            def status() -> None:
                retries = f", {state['retries']} retries" if state["retries"] else ""
                bar.set_postfix_str(f"units {state['done']}/{len(units)}{retries}")

            def done(unit: Unit, receipt: dict, counted: bool = False) -> None:
                state["done"] += 1
                if not counted:
                    bar.update(work_of(unit))
                self.run.remove(unit.failure_record)  # a unit given up on earlier has now succeeded
                status()

            def retry(unit: Unit, error: str) -> None:
                state["retries"] += 1
                status()

            status()
            if self.executor is None:
                for unit in todo:
                    done(unit, self.worker.run_unit(unit, bar.update), counted=True)
                return
            failures = self.executor.run(todo, done, retry)
        if failures:
            for f in failures:
                self.run.write_table(f.unit.failure_record, failure_table(
                    [dict(kind="unit", unit=f.unit.file, stage=f.unit.stage, attempts=f.attempts, error=f.error)]))
            raise UnitsFailed(failures)

    def run_all(self) -> None:
        """Every stage in order; each skips what is already on disk."""
        if not self.run.exists("run.json"):
            self.run.write_json("run.json", self.manifest)
        self.run_stage("predict", self.predict_units(), lambda u: len(u.image_ids), "img")
        selected = self.selected()
        self.run_stage("mask", self.mask_units(selected), lambda u: len(u.image_ids), "img")
        rounds = []
        removed: list[tuple[int, int]] = []
        for r in range(self.cfg.rounds):
            units = self.scan_units(selected, r, removed)
            self.run_stage("scan" if self.cfg.rounds == 1 else f"scan r{r}", units,
                           lambda u: len(u.image_ids) * len(u.heads), "pair")
            table = self.rank_round(selected, r, removed)
            rounds.append(table)
            removed += [(row["layer"], row["head"]) for row in table.slice(0, self.cfg.k_per_round).to_pylist()]
        self.run.write_table("rankings.parquet", merge_rounds(rounds, self.cfg.k_per_round))

    def rank_round(self, selected: list[int], round: int = 0, removed: list[tuple[int, int]] = ()) -> pa.Table:
        """Score one round's heads from its deltas, one unit file at a time, best first.

        Every score the deltas allow gets its columns (name, name_stderr, name_ci_low, name_ci_high,
        name_rank); score, stderr, ci_low, ci_high and rank are those of the config's `score`. The
        driver holds one (heads x images) matrix per score, as the bootstrap needs, never the rows of
        the whole data set at once. Rounds after the first are kept in rounds/.
        """
        units = self.scan_units(selected, round, removed)
        missing = self.missing(units)
        if missing:
            raise RuntimeError(f"cannot rank: {len(missing)} scan units are missing, e.g. {missing[0].file}")
        heads = [h for h in self.adapter.heads if h not in set(removed)]
        names = list(SCORES) if self.cfg.measure_fig else ["big_drop"]
        matrices = score_matrices(self.run, units, heads, sorted(selected), names)
        columns = {"layer": pa.array([l for l, _ in heads], pa.int32()),
                   "head": pa.array([h for _, h in heads], pa.int32())}
        for name, matrix in matrices.items():
            stats = head_scores(matrix, bootstrap=self.cfg.bootstrap, ci_level=self.cfg.ci_level, seed=self.cfg.seed)
            if name == self.cfg.score:
                chosen = stats
            columns[name] = pa.array(stats["score"], pa.float64())
            columns.update({f"{name}_{k}": pa.array(stats[k], pa.float64()) for k in ("stderr", "ci_low", "ci_high")})
            columns[f"{name}_rank"] = pa.array(ranks(stats["score"]), pa.int64())
        table = pa.table({**columns, **{k: pa.array(chosen[k], pa.float64()) for k in ("score", "stderr", "ci_low", "ci_high")},
                          "n": pa.array(chosen["n"], pa.int64())})
        table = table.append_column("rank", pa.array(ranks(table["score"].to_numpy()), pa.int64())).sort_by("rank")
        if self.cfg.rounds > 1:
            self.run.write_table(f"rounds/round-{round:02d}.parquet", table)
        return table


def merge_rounds(rounds: list[pa.Table], k_per_round: int) -> pa.Table:
    """One ranking: each round's removed heads in the order they were removed, then the last round's
    ranking of the heads left; `round` says which round's scan each row's score comes from."""
    parts = [t.slice(0, k_per_round) for t in rounds[:-1]] + [rounds[-1]]
    merged = pa.concat_tables([t.append_column("round", pa.array(np.full(t.num_rows, r), pa.int32()))
                               for r, t in enumerate(parts)])
    return merged.set_column(merged.schema.get_field_index("rank"), "rank",
                             pa.array(np.arange(1, merged.num_rows + 1), pa.int64()))


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
    needs_fig = any(name != "big_drop" for name in names)
    columns = ["image_id", "layer", "head", "big", "big_ablated"] + (["fig", "fig_ablated"] if needs_fig else [])
    for unit in units:
        t = run.read_table(unit.file, columns)
        layer, head, image = (t[k].to_numpy().astype(np.int64) for k in ("layer", "head", "image_id"))
        pos = np.minimum(np.searchsorted(ids, image, sorter=by_id), len(ids) - 1)
        c = by_id[pos]
        known_head = (layer < head_index.shape[0]) & (head < head_index.shape[1])
        r = np.where(known_head, head_index[np.where(known_head, layer, 0), np.where(known_head, head, 0)], -1)
        if (r < 0).any() or (ids[c] != image).any():
            raise RuntimeError(f"{unit.file} holds a head or image this run does not scan: remove the run's deltas/ "
                               "folder and scan again")
        terms = score_terms(*(t[k].to_numpy() for k in columns[3:]))
        for name in names:
            matrices[name][r, c] = terms[name]
        np.add.at(filled, (r, c), 1)
    if (filled != 1).any():
        bad = int((filled != 1).sum())
        raise RuntimeError(f"deltas/ does not hold each of {len(heads)} heads once per each of {len(images)} images "
                           f"({bad} cells missing or repeated): remove the run's deltas/ folder and scan again")
    return matrices


def scanned_model_spec(meta: dict, checkpoint: str | None = None) -> ModelSpec:
    """The ModelSpec that rebuilds the model a run scanned, from its run.json (`checkpoint` if the file moved)."""
    m = meta["model"]
    return ModelSpec(name=m["name"], checkpoint=checkpoint or m["checkpoint"], num_classes=m["num_classes"],
                     img_size=m["img_size"], model_kwargs=m["model_kwargs"],
                     random_weights=m["weights"].startswith("random:"), seed=meta["config"]["seed"],
                     **spec_from_options(m.get("options")))


def load_scanned(url: str, meta: dict, device: str = "cpu", checkpoint: str | None = None) -> LoadedModel:
    """The model a run scanned, refusing weights other than the ones its ranking belongs to."""
    spec = scanned_model_spec(meta, checkpoint)
    loaded = load(spec, device)
    if loaded.fingerprint["weights"] != meta["model"]["weights"]:
        raise ModelError(f"the weights loaded for {spec.name} ({loaded.fingerprint['weights']}) are not the ones "
                         f"{url} scanned ({meta['model']['weights']}); the checkpoint changed since the scan. "
                         "Pass the original file with --checkpoint")
    return loaded


class UnitsFailed(RuntimeError):
    """Some units failed `max_attempts` times; the rest of their stage is done."""

    def __init__(self, failures: list):
        self.failures = failures
        listed = "\n  ".join(f"{f.unit.file} ({f.attempts} attempts): {f.error.splitlines()[0] if f.error else ''}"
                             for f in failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} unit(s) failed for good (recorded in failures/):\n  {listed}{more}")


def predict_units(n_images: int, cfg: Config) -> list[Unit]:
    return [Unit("predict", k, s) for k, s in enumerate(shards(list(range(n_images)), cfg.unit_images))]


def mask_units(selected: list[int], cfg: Config) -> list[Unit]:
    """One unit per mask batch: masks optimised together must always be the same images."""
    return [Unit("mask", k, s) for k, s in enumerate(shards(selected, cfg.mask_batch))]


def scan_units(selected: list[int], cfg: Config, heads_per_layer: list[int], round: int = 0,
               removed: list[tuple[int, int]] = ()) -> list[Unit]:
    """Image shards x layer ranges; each unit names the mask files that hold its images."""
    size, batch = cfg.unit_images, cfg.mask_batch
    gone = set(removed)
    units = []
    for k, ids in enumerate(shards(selected, size)):
        first, last = k * size // batch, (k * size + len(ids) - 1) // batch
        inputs = tuple(Unit("mask", g, ()).file for g in range(first, last + 1))
        for a, b in layer_ranges(len(heads_per_layer), cfg.unit_layers):
            heads = tuple((l, h) for l in range(a, b) for h in range(heads_per_layer[l]) if (l, h) not in gone)
            if heads:
                units.append(Unit("scan", k, ids, (a, b), inputs, heads, round, tuple(removed)))
    return units


def run_status(run: RunDir) -> dict:
    """What a run has finished, what it still misses and what failed, from its files alone."""
    meta = run.read_json("run.json")
    cfg = Config(**meta["config"])
    plan = meta["plan"]
    stages = {}
    predict = predict_units(plan["n_images"], cfg)
    stages["predict"] = (len(predict) - len(missing_units(run, predict)), len(predict))
    if stages["predict"][0] == stages["predict"][1]:
        preds = run.read_folder("predictions", columns=["image_id", "correct"])
        correct = preds.filter(preds["correct"])["image_id"].to_pylist()
        selected = select_images(correct, cfg.tp_ratio, cfg.seed) if correct else []
        stages_units = [("mask", mask_units(selected, cfg)), ("scan", scan_units(selected, cfg, plan["heads_per_layer"]))]
        removed: list[tuple[int, int]] = []
        for r in range(1, cfg.rounds):  # a round's units are known once the round before it is ranked
            if not run.exists(f"rounds/round-{r - 1:02d}.parquet"):
                break
            best = run.read_table(f"rounds/round-{r - 1:02d}.parquet").slice(0, cfg.k_per_round).to_pylist()
            removed += [(row["layer"], row["head"]) for row in best]
            stages_units.append((f"scan round {r}", scan_units(selected, cfg, plan["heads_per_layer"], r, removed)))
        for name, units in stages_units:
            stages[name] = (len(units) - len(missing_units(run, units)), len(units))
    failures = run.read_folder("failures")
    return {"meta": meta, "stages": stages, "ranked": run.exists("rankings.parquet"),
            "failures": failures.to_pylist() if failures is not None else []}


def missing_units(run: RunDir, units: list[Unit]) -> list[Unit]:
    done = set()
    for folder in {posixpath.dirname(u.file) for u in units}:
        done |= {f"{folder}/{n}" for n in run.list(folder)}
    return [u for u in units if u.file not in done]


def progress_bar(stage: str, total: int, initial: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{stage:>7}", unit=unit, unit_scale=True,
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)

