"""Eval sets: images with labels, and foreground cells for BIR and the background swap. The scan's own data
(BIR on D with the run's masks), another data set of the same classes (masks learned on the intact model,
cached in eval/), and held-out images for --auto-k (correctly classified, never seen by the scores).

Counterfactual conflict accuracy swaps backgrounds among an eval set's masked images: each gets
SWAP_DONORS donors of another label, drawn seeded (`method.choose_donors`), and each swapped image
(its foreground over a donor) is judged against its own label."""
from __future__ import annotations

import hashlib
import posixpath
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ..data import DataError, ImageSource, open_source
from ..method import choose_donors
from ..pipeline import select_images
from ..progress import progress_bar
from ..rundir import Run, Scanned, StorageError, decode_fg


@dataclass
class EvalSet:
    """Images with labels, plus a subset with foreground cells (learned on the intact model) for BIR."""

    name: str
    images: torch.Tensor
    labels: np.ndarray
    mask_images: torch.Tensor
    fg: torch.Tensor
    url: str = ""
    in_sample: bool = False  # the scan's own data: BIR on D, the very images the heads were ranked on
    skipped: list[str] = field(default_factory=list)  # unreadable images, "path: error"
    mask_labels: np.ndarray | None = None  # labels of mask_images
    donors: np.ndarray | None = None  # (mask images, SWAP_DONORS) positions in mask_images of another label; -1: none

    @property
    def chance(self) -> float:
        return 1 / len(np.unique(self.labels))

    @property
    def swappable(self) -> bool:
        """Whether counterfactual conflict accuracy can be measured: every masked image has donors of another label."""
        return self.donors is not None and len(self.donors) > 0 and bool((self.donors >= 0).all())

    def with_donors(self, seed: int) -> "EvalSet":
        """This set with SWAP_DONORS seeded donors of another label for each masked image."""
        self.donors = choose_donors(self.mask_labels, seed, SWAP_DONORS)
        return self


SWAP_DONORS = 4  # donors per masked image for counterfactual conflict accuracy (each image counts once)


def scan_eval_set(scanned: Scanned, name: str | None = None) -> EvalSet:
    """Every readable image of the scan's data; BIR on D with the run's own masks (in-sample)."""
    source = scanned.source
    images, ok, failed = source.load(source.records, scanned.loaded.transform)
    if not ok:
        raise DataError(f"{source.url}: none of its images can be read now")
    position = {r.image_id: i for i, r in enumerate(ok)}
    masks = scanned.run.masks(["image_id", "fg"])
    masks = masks.filter(pa.array([i in position for i in masks["image_id"].to_pylist()]))
    fg = decode_fg(masks["fg"], scanned.cfg.mask_size)
    labels = np.array([r.label for r in ok])
    in_d = [position[i] for i in masks["image_id"].to_pylist()]
    return EvalSet(name or set_name(source.url), images, labels, images[in_d], fg, source.url, True,
                   [f"{r.path}: {e}" for r, e in failed], labels[in_d]).with_donors(scanned.cfg.seed)


def open_eval_source(run: Run, url: str) -> ImageSource:
    """An eval data set whose labels mean the same model outputs as the scan's: class folders named by
    output index, or the very class names the scan had (mapped by sorted position, as there). Needs the
    run's record only, not its model, so commands check --eval-data before loading anything."""
    try:
        source = open_source(url)
    except DataError as e:
        raise DataError(str(e).replace("--data", "--eval-data", 1)) from None
    outputs = run.meta["model"]["num_classes"]
    if all(c.isdigit() for c in source.classes):
        too_big = [c for c in source.classes if int(c) >= outputs]
        if too_big:
            raise DataError(f"--eval-data {url}: class {too_big[0]} is not an output of {run.meta['model']['name']}, "
                            f"which has {outputs} classes")
        return source
    classes = run.meta["data"]["classes"]
    if source.classes != classes:
        raise DataError(f"--eval-data {url} has the classes {', '.join(source.classes)}, but {run.url} was "
                        f"scanned with {', '.join(classes)}; named classes must be the same ones, so that each means "
                        f"the same output (or name the class folders by output index: 0 to {outputs - 1})")
    return source


def eval_set(scanned: Scanned, source: ImageSource, mask_images: int, name: str | None = None,
             records: list | None = None, progress: bool = True) -> EvalSet:
    """All readable images of a data set (or of `records`, a subset of it), and masks learned on the
    intact model for a seeded sample.

    The masks are cached in eval/, keyed by the data's listing and the ids of the sampled images (so a
    changed set of readable images gets its own masks), checked against those ids when read, and learned
    in groups of the run's mask_batch, so a repeated command reuses them and gets the same BIR.
    """
    images, ok, failed = source.load(source.records if records is None else records, scanned.loaded.transform)
    if not ok:
        raise DataError(f"--eval-data {source.url}: none of its {len(source)} images can be read "
                        f"({failed[0][1] if failed else 'no images chosen'})")
    count = min(mask_images, len(ok))
    sample = select_images(range(len(ok)), count / len(ok), scanned.cfg.seed)
    sample_ids = [ok[i].image_id for i in sample]
    name = name or set_name(source.url)
    key = source.fingerprint()[:12] + "-" + hashlib.sha256(",".join(map(str, sample_ids)).encode()).hexdigest()[:12]
    cache = f"eval/masks-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{key}-n{count}.parquet"
    fg = cached_masks(scanned, cache, sample_ids)
    if fg is None:
        print(f"learning masks of {len(sample)} images of {name} on the intact model, for BIR (kept in {cache})",
              file=sys.stderr)
        batch, steps = scanned.cfg.mask_batch, max(1, scanned.cfg.mask_steps)
        with progress_bar("masks", len(sample) * steps, 0, "img-step", progress) as bar:
            groups = [sample[i: i + batch] for i in range(0, len(sample), batch)]
            fg = torch.cat([scanned.replica.masks(images[g], scanned.cfg, on_step=lambda n=len(g): bar.update(n)).fg
                            for g in groups])
        scanned.dir.write_table(cache, pa.table({"image_id": sample_ids,
                                                 "fg": list(fg.reshape(len(sample), -1).numpy())}))
    labels = np.array([r.label for r in ok])
    return EvalSet(name, images, labels, images[sample], fg, source.url, False,
                   [f"{r.path}: {e}" for r, e in failed], labels[sample]).with_donors(scanned.cfg.seed)


def cached_masks(scanned: Scanned, cache: str, image_ids: list[int]) -> torch.Tensor | None:
    """Cached foreground cells of exactly these images, in this order; None when there are none (or the file
    holds other images, or is damaged: the masks are learned again)."""
    if not scanned.dir.exists(cache):
        return None
    try:
        table = scanned.dir.read_table(cache, ["image_id", "fg"])
    except StorageError:
        return None
    side = scanned.cfg.mask_size
    cells = table["fg"].to_pylist()[:1]
    if table["image_id"].to_pylist() != list(image_ids) or any(len(v) != side * side for v in cells):
        print(f"{cache} holds masks of other images; learning them again", file=sys.stderr)
        return None
    return decode_fg(table["fg"], side)


def heldout_set(scanned: Scanned, url: str | None, mask_images: int, progress: bool = True,
                swaps: bool = False) -> EvalSet:
    """Images the intact model classifies correctly and the scores never saw: of the scan's own data,
    those outside D (the run's predictions say which are correct); of another data set (`url`), those
    it predicts correctly now. Accuracy on this set starts at 1, so its drop is the clean accuracy lost.
    With `swaps` (counterfactual conflict accuracy), images of one class only are refused before any mask
    is learned: their backgrounds cannot be swapped for another class's."""
    source = scanned.source if url is None else open_eval_source(scanned.run, url)
    d_ids = set(scanned.dir.read_folder("masks", ["image_id"])["image_id"].to_pylist())
    if source.fingerprint() == scanned.run.meta["data"]["fingerprint"]:
        preds = scanned.dir.read_folder("predictions", ["image_id", "correct"])
        correct = {i for i, ok in zip(preds["image_id"].to_pylist(), preds["correct"].to_pylist()) if ok}
        records = [r for r in source.records if r.image_id in correct and r.image_id not in d_ids]
    else:
        images, ok, _ = source.load(source.records, scanned.loaded.transform)
        if not ok:
            raise DataError(f"--eval-data {source.url}: none of its {len(source)} images can be read")
        pred = scanned.replica.logits(images).argmax(dim=1).numpy()
        records = [r for r, p in zip(ok, pred) if p == r.label]
    if len(records) < 2:
        raise DataError(f"{source.url} has {len(records)} correctly classified image(s) outside D; --auto-k needs "
                        "held-out images: pass --eval-data with a data set of the same classes")
    if swaps and len({r.label for r in records}) < 2:
        raise DataError(f"--objective conflict: the {len(records)} held-out images of {source.url} (correctly classified, "
                        "outside D) are all of one class, so their backgrounds cannot be swapped for another class's; "
                        "use --objective bir, or --eval-data with a data set the model gets right in several classes")
    return eval_set(scanned, source, mask_images, f"{set_name(source.url)}-heldout", records, progress)


def set_name(url: str) -> str:
    base = posixpath.basename(url.rstrip("/"))
    return base[: -len(".parquet")] if base.endswith(".parquet") else base or url


def eval_sets(scanned: Scanned, urls: list[str] | None, mask_images: int, progress: bool = True) -> list[EvalSet]:
    """The --eval-data sets (the scan's own data, with D's masks, when given none or named among them).

    Every source is opened and checked before any images are read or masks learned.
    """
    if not urls:
        return [scan_eval_set(scanned)]
    sources = [open_eval_source(scanned.run, url) for url in urls]
    fingerprint = scanned.run.meta["data"]["fingerprint"]
    names: list[str] = []
    for s in sources:
        base = set_name(s.url)
        names.append(base if base not in names else f"{base}-{len(names) + 1}")
    return [scan_eval_set(scanned, name) if s.fingerprint() == fingerprint
            else eval_set(scanned, s, mask_images, name, progress=progress) for s, name in zip(sources, names)]
