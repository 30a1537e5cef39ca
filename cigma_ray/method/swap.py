"""The background-swap counterfactual and counterfactual conflict accuracy.

For an image I_i with foreground cells S_i and a donor image I_d of another class,
`I_swap = S_i * I_i + (1 - S_i) * I_d`: the image's own foreground on another class's background.

- SWAP_i = JS(q(I_i), q(I_swap)): how far another class's background moves the prediction (the
  scan measures it with each head ablated too: swap_drop = mean_i (SWAP_i - SWAP_i^(-h))).
- Counterfactual conflict accuracy: accuracy on swapped images against the image's own label, a
  conflicting split made from the user's own data and masks.

Donors are drawn seeded and uniformly among the images of another class; the draw is its own
random stream (seeded by `seed` and a fixed stream number), so it never shifts D's sample.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .masks import blend, upsample_hard

DONOR_STREAM = 0x5A  # second word of the donors' seed: a stream apart from D's sample (seeded by `seed` alone)


def choose_donors(classes, seed: int, per_image: int = 1) -> np.ndarray:
    """(N, per_image) positions of donor images: for each image, `per_image` images of another class,
    drawn uniformly (without replacement while there are enough, with replacement otherwise), seeded.

    -1 where no image has another class. The draw depends only on `classes` (in the order given) and
    `seed`, so every process that sees the same images in the same order draws the same donors.
    """
    classes = np.asarray(classes)
    if per_image < 1:
        raise ValueError(f"per_image={per_image}: at least one donor per image")
    rng = np.random.default_rng([seed, DONOR_STREAM])
    out = np.full((len(classes), per_image), -1, dtype=np.int64)
    for i, c in enumerate(classes):
        candidates = np.flatnonzero(classes != c)
        if len(candidates):
            out[i] = rng.choice(candidates, size=per_image, replace=len(candidates) < per_image)
    return out


def swapped(images: torch.Tensor, fg: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
    """I_swap = S * I + (1 - S) * I_donor: each image's foreground cells (N, s, s) over its donor's image."""
    s = upsample_hard(fg, tuple(images.shape[-2:])).to(images.dtype)
    return blend(images, s, donors)


def conflict_statistics(correct) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Counterfactual conflict accuracy as a function of per-image weights (m, n) -> (m,), for
    `bootstrap.bootstrap`. `correct` is (n, donors) booleans: swapped image (i, j) classified as image i's
    own label. An image counts once, with the share of its swaps classified right, so the bootstrap
    resamples images (not swaps, which share an image and its mask)."""
    per_image = np.asarray(correct, dtype=np.float64).reshape(len(correct), -1).mean(axis=1)
    return {"conflict_accuracy": lambda w: w @ per_image / w.sum(axis=1)}
