"""A replica's side of a stage: `Worker.run_unit` reads a unit's inputs, computes, and writes the
unit's file, in this process or on a Ray actor (distributed/ imports this module, never the stages)."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..data import ImageSource, open_source
from ..engine import Replica
from ..models import LoadedModel, load
from ..rundir import RunDir, decode_fg, install_means, means_table
from .units import NO_DONOR, Job, Unit


class Worker:
    """A model replica bound to a run: reads a unit's inputs, computes, writes the unit's file."""

    def __init__(self, job: Job, loaded: LoadedModel | None = None, source: ImageSource | None = None):
        self.job = job
        self.cfg = job.config
        self.run = RunDir(job.out)
        self.source = source or open_source(job.data)
        self.loaded = loaded or load(job.model, job.device, job.precision)
        self.replica = Replica(self.loaded, job.device, job.precision, self.cfg.batch_size)
        self.means_installed = False

    def _donor_images(self, unit: Unit, donors: list[int], images: torch.Tensor) -> torch.Tensor:
        """The donor images of a unit's `images`, read by id wherever they are (any shard of D); an image with
        no donor (NO_DONOR: D holds one predicted class) is its own."""
        wanted = sorted(set(donors) - {NO_DONOR})
        loaded, ok, failed = self.source.load([self.source.records[i] for i in wanted], self.loaded.transform)
        if failed:
            raise RuntimeError(f"{unit.file}: donor image {failed[0][0].path} of the background swap cannot be read "
                               f"now ({failed[0][1]}); restore it and run the same command again")
        position = {r.image_id: i for i, r in enumerate(ok)}
        return torch.stack([images[j] if d == NO_DONOR else loaded[position[d]] for j, d in enumerate(donors)])

    def _install_means(self) -> None:
        """ablation: mean: the run's means become the ablated heads' substitutes (once, before the first scan unit)."""
        if self.cfg.ablation == "mean" and not self.means_installed:
            install_means(self.loaded, self.run)
            self.means_installed = True

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
        receipt = self.run.write_unit(unit.file, table)  # the file, then its receipt with the sha256
        return {**receipt, "seconds": time.perf_counter() - start}

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
            return empty_masks_table(self.cfg.measure_swap)
        result = self.replica.masks(images, self.cfg, on_step=lambda: progress(len(ok)))  # image-steps
        columns = {
            "image_id": pa.array([r.image_id for r in ok], pa.int64()),
            "mask": pa.array(list(result.mask.reshape(len(ok), -1).numpy()), pa.list_(pa.float32())),
            "fg": pa.array(list(result.fg.reshape(len(ok), -1).numpy()), pa.list_(pa.bool_())),
            "fig": pa.array(result.fig.numpy(), pa.float64()),
            "big": pa.array(result.big.numpy(), pa.float64()),
            "bir": pa.array(result.bir.numpy(), pa.float64()),
        }
        if self.cfg.measure_swap:  # the background swap: each image's foreground on its donor's image
            if len(unit.donors) != len(unit.image_ids):
                raise ValueError(f"{unit.file}: a mask unit of a run with measure_swap needs each image's donor "
                                 "(Pipeline.mask_units draws them)")
            donor_of = dict(zip(unit.image_ids, unit.donors))
            donors = [donor_of[r.image_id] for r in ok]
            swap = self.replica.swap_gains(images, result.fg, self._donor_images(unit, donors, images), self.cfg.tau)
            columns["donor"] = pa.array(donors, pa.int64())
            columns["swap"] = pa.array(swap.numpy(), pa.float64())
        return pa.table(columns)

    def _means(self, unit: Unit, progress) -> pa.Table:
        """Sums of every head's output over the unit's images of D and their tokens, on the intact model."""
        images, ok = self._images(unit)
        if not ok:
            return means_table([np.zeros(p.in_features) for p in self.loaded.adapter.gates.projections],
                               [0] * self.loaded.adapter.num_layers, 0)
        sums = self.replica.head_output_sums(images)
        progress(len(unit.image_ids))
        return means_table([s.numpy() for s in sums.sums], sums.counts, len(ok))

    def _masked_images(self, unit: Unit):
        """(masks rows, image ids, images) of a unit's images of D, by image id; images unreadable now are left out."""
        swap_columns = ["donor", "swap"] if self.cfg.measure_swap else []
        masks = pa.concat_tables([self.run.read_table(f, ["image_id", "fg", "fig", "big", *swap_columns])
                                  for f in unit.inputs])
        wanted = pa.array(unit.image_ids, pa.int64())
        masks = masks.filter(pc.is_in(masks["image_id"], value_set=wanted)).sort_by("image_id")
        ids = masks["image_id"].to_pylist()
        images, ok = self._images(replace(unit, image_ids=tuple(ids)))  # round and removed heads kept: its name
        if len(ok) != len(ids):  # an image that was readable before is not now: keep the rows aligned
            keep = {r.image_id for r in ok}
            masks = masks.filter(pa.array([i in keep for i in ids]))
            ids = [i for i in ids if i in keep]
        return masks, ids, images

    def _screen(self, unit: Unit, progress) -> pa.Table:
        """The gradient pre-screen of a unit's images: every head's dBIG_i/dg_h (and dFIG_i/dg_h) at g = 1."""
        self._install_means()  # the gradient of a head's gate is then that of its mean ablation
        masks, ids, images = self._masked_images(unit)
        heads = self.loaded.adapter.heads
        if not ids:
            return screen_table([], heads, None, self.cfg.measure_fig)
        screened = self.replica.screen(images, decode_fg(masks["fg"], self.cfg.mask_size), self.cfg.tau,
                                       self.cfg.measure_fig)
        progress(len(ids))
        return screen_table(ids, heads, screened, self.cfg.measure_fig)

    def _scan(self, unit: Unit, progress) -> pa.Table:
        self._install_means()
        masks, ids, images = self._masked_images(unit)
        if not ids:
            return empty_deltas_table(self.cfg.measure_fig, self.cfg.measure_swap)
        fg = decode_fg(masks["fg"], self.cfg.mask_size)
        heads = list(unit.heads)
        donor_images = (self._donor_images(unit, masks["donor"].to_pylist(), images) if self.cfg.measure_swap
                        else None)
        ablated = self.replica.scan(images, fg, heads, self.cfg.tau, on_pairs=progress, removed=unit.removed,
                                    measure_fig=self.cfg.measure_fig, donor_images=donor_images)
        fig, big = masks["fig"].to_numpy(), masks["big"].to_numpy()
        swap = masks["swap"].to_numpy() if self.cfg.measure_swap else None
        if unit.removed:  # the baseline is the model as earlier rounds left it
            keep = self.replica.keep_without(list(unit.removed))
            fig, big = self.replica.gains(images, fg, self.cfg.tau, keep)
            fig, big = fig.numpy().astype(np.float64), big.numpy().astype(np.float64)
            if donor_images is not None:
                swap = self.replica.swap_gains(images, fg, donor_images, self.cfg.tau, keep).numpy().astype(np.float64)
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
        if ablated.swap is not None:
            columns["swap"] = pa.array(np.tile(swap, len(heads)), pa.float64())
            columns["swap_ablated"] = pa.array(ablated.swap.numpy().astype(np.float64).reshape(-1), pa.float64())
        return pa.table(columns)


FAILURE_SCHEMA = pa.schema([("kind", pa.string()), ("unit", pa.string()), ("stage", pa.string()),
                            ("image_id", pa.int64()), ("path", pa.string()), ("attempts", pa.int64()),
                            ("error", pa.string())])


def failure_table(rows: list[dict]) -> pa.Table:
    """failures/ rows: kind "image" (unreadable, skipped) or "unit" (failed max_attempts times)."""
    return pa.Table.from_pylist([{k: r.get(k) for k in FAILURE_SCHEMA.names} for r in rows], schema=FAILURE_SCHEMA)


def empty_masks_table(measure_swap: bool = False) -> pa.Table:
    swap = {"donor": pa.array([], pa.int64()), "swap": pa.array([], pa.float64())} if measure_swap else {}
    return pa.table({"image_id": pa.array([], pa.int64()), "mask": pa.array([], pa.list_(pa.float32())),
                     "fg": pa.array([], pa.list_(pa.bool_())), "fig": pa.array([], pa.float64()),
                     "big": pa.array([], pa.float64()), "bir": pa.array([], pa.float64()), **swap})


def screen_table(ids: list[int], heads: list[tuple[int, int]], screened, measure_fig: bool) -> pa.Table:
    """screen/ rows, one per (head, image): image_id, layer, head, grad_big, big (intact, same forward) and,
    with measure_fig, grad_fig, fig."""
    n = len(ids)
    columns = {"image_id": pa.array(np.tile(np.array(ids, dtype=np.int64), len(heads)), pa.int64()),
               "layer": pa.array(np.repeat([l for l, _ in heads], n).astype(np.int32), pa.int32()),
               "head": pa.array(np.repeat([h for _, h in heads], n).astype(np.int32), pa.int32())}
    pairs = [("grad_big", "big")] + ([("grad_fig", "fig")] if measure_fig else [])
    for grad, gain in pairs:
        g = np.zeros((len(heads), 0)) if screened is None else getattr(screened, grad).numpy()
        v = np.zeros(0) if screened is None else getattr(screened, gain).numpy()
        columns[grad] = pa.array(g.astype(np.float64).reshape(-1), pa.float64())
        columns[gain] = pa.array(np.tile(v.astype(np.float64), len(heads)), pa.float64())
    return pa.table(columns)


def empty_deltas_table(measure_fig: bool = False, measure_swap: bool = False) -> pa.Table:
    names = (["big", "big_ablated", "delta"] + (["fig", "fig_ablated"] if measure_fig else [])
             + (["swap", "swap_ablated"] if measure_swap else []))
    return pa.table({"image_id": pa.array([], pa.int64()), "layer": pa.array([], pa.int32()),
                     "head": pa.array([], pa.int32()), **{k: pa.array([], pa.float64()) for k in names}})
