"""What the report shows beyond the run's tables, computed here so the report only draws it: how stable
the top K is under resampling D, and per-image panels (masks, counterfactuals, predictions and
attention rollout before and after removing the top K)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import DataError
from ..method import counterfactuals, probs, spearman, split_half, top_k_probability
from ..models.attention import attention_rollout
from ..pipeline.ranking import score_matrices
from ..pipeline.units import scan_units
from ..rundir import Run, Scanned, decode_fg


@dataclass
class Stability:
    heads: list[tuple[int, int]]
    k: int
    images: int  # images of D
    resamples: int
    probability: np.ndarray  # per head: P(in the top K) over bootstrap resamples of D
    half_a: np.ndarray  # per head: score from each of two disjoint seeded halves of D
    half_b: np.ndarray
    spearman: float  # of the two halves' scores (NaN when undefined)


def first_round_deltas(run: Run, image_ids: list[int]) -> np.ndarray:
    """The (heads, images) matrix of the run's score's terms in its first scan (every scanned head, the intact
    model)."""
    cfg = run.config
    units = scan_units(image_ids, cfg, run.heads_per_layer, skipped=run.skipped_layers)
    return score_matrices(run.dir, units, run.heads, image_ids, [cfg.score])[cfg.score]


def stability(run: Run, k: int) -> Stability | None:
    """Top-K probability over the run's bootstrap resamples (1000 when the run has none) and split-half
    agreement, from the run's first scan; None for an adaptive scan (most heads were measured on part of D)."""
    if run.adaptive:
        return None
    image_ids = sorted(run.masks(["image_id"])["image_id"].to_pylist())
    deltas = first_round_deltas(run, image_ids)
    cfg = run.meta["config"]
    resamples = cfg["bootstrap"] or 1000
    prob = top_k_probability(deltas, k, resamples, cfg["seed"])
    if len(image_ids) < 2:
        half_a = half_b = deltas.mean(axis=1)
        rho = float("nan")
    else:
        half_a, half_b = split_half(deltas, cfg["seed"])
        rho = spearman(half_a, half_b)
    return Stability(run.heads, k, len(image_ids), resamples, prob, half_a, half_b, rho)


@dataclass
class ImagePanel:
    image_id: int
    label: str
    shown: np.ndarray  # (H, W, 3) in [0, 1]
    mask: np.ndarray  # (s, s) soft mask
    fg: np.ndarray  # (s, s) bool
    no_bg: np.ndarray
    no_fg: np.ndarray
    before: tuple[str, float]  # predicted class, its probability
    after: tuple[str, float]
    saliency: tuple[np.ndarray, np.ndarray] | None  # rollout (grid) intact, pruned


def displayable(images: torch.Tensor, model: torch.nn.Module) -> np.ndarray:
    """Preprocessed images back to RGB in [0, 1] with the model's own normalisation."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def class_name(classes: list[str], index: int) -> str:
    """Folder names when they are names; with integer folders the index itself is the class."""
    if all(c.isdigit() for c in classes) or index >= len(classes):
        return str(index)
    return classes[index]


def image_panels(scanned: Scanned, removed: list[tuple[int, int]], n_images: int) -> list[ImagePanel]:
    """`n_images` images spread evenly over D (by image id, so over the classes of an ImageFolder),
    with what the method made of them."""
    loaded, source, cfg, replica = scanned.loaded, scanned.source, scanned.cfg, scanned.replica
    masks = scanned.run.masks()
    masks = masks.take(np.unique(np.linspace(0, masks.num_rows - 1, min(n_images, masks.num_rows)).round().astype(int)))
    ids = masks["image_id"].to_pylist()
    images, ok, failed = source.load([source.records[i] for i in ids], loaded.transform)
    if failed:
        raise DataError(f"image {failed[0][0].path} of D cannot be read now ({failed[0][1]})")
    side = cfg.mask_size
    soft = np.stack(masks["mask"].to_numpy(zero_copy_only=False)).reshape(-1, side, side)
    fg = decode_fg(masks["fg"], side)
    no_bg, no_fg = counterfactuals(images, fg)
    keep = replica.keep_without(removed)
    before, after = (probs(replica.logits(images, k), cfg.tau).numpy() for k in (None, keep))
    model = loaded.adapter.model
    on_device = images.to(replica.device)
    rollouts = [attention_rollout(loaded, on_device, k, r) for k, r in (({}, []), (keep, removed))]
    classes = scanned.run.meta["data"]["classes"]
    shown, shown_no_bg, shown_no_fg = (displayable(x, model) for x in (images, no_bg, no_fg))

    def prediction(p: np.ndarray) -> tuple[str, float]:
        return class_name(classes, int(p.argmax())), float(p.max())

    return [ImagePanel(image_id=i, label=class_name(classes, r.label), shown=shown[j], mask=soft[j],
                       fg=fg[j].numpy(), no_bg=shown_no_bg[j], no_fg=shown_no_fg[j], before=prediction(before[j]),
                       after=prediction(after[j]),
                       saliency=None if rollouts[0] is None else (rollouts[0][j], rollouts[1][j]))
            for j, (i, r) in enumerate(zip(ids, ok))]
