"""A planted-shortcut image benchmark whose answer is known.

Each 64x64 image shows one of four shapes (the class) on a textured background. Every
background family belongs to one class, and in the `train` and `scan` splits 95% of the
images have their own class's background, so a model can reach 95% accuracy by reading
the background alone. The `aligned` (100%) and `conflicting` (0%) splits tell a model
that learned the shape from one that learned the shortcut.

Only numpy and Pillow: the generator must stay importable without torch.
"""
from __future__ import annotations

import colorsys
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 2
# Sorted, so a class's index here is the index torchvision's ImageFolder gives its folder.
CLASSES: tuple[str, ...] = ("cross", "ring", "square", "triangle")
IMAGE_SIZE = 64

# Background hue family of each class (fraction of the colour wheel).
_BACKGROUND_HUES = (0.14, 0.0, 0.33, 0.6)
_MARGIN = 5  # keeps the shape off the border, so a slight centre crop never cuts it


@dataclass(frozen=True)
class Split:
    size: int  # images in total, balanced over the classes
    p_aligned: float  # chance an image's background is its own class's


SPLITS: dict[str, Split] = {
    "train": Split(6000, 0.95),
    "scan": Split(400, 0.95),
    "aligned": Split(400, 1.0),
    "conflicting": Split(400, 0.0),
}


def _background(rng: np.random.Generator, background: int) -> np.ndarray:
    """A mid-tone colour from the class's hue family, with a gentle gradient and pixel noise."""
    hue = (_BACKGROUND_HUES[background] + rng.uniform(-0.04, 0.04)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 0.7), rng.uniform(0.5, 0.7))) * 255
    ramp = np.linspace(-1.0, 1.0, IMAGE_SIZE)
    gy, gx = rng.uniform(-15, 15, size=2)
    gradient = gy * ramp[:, None] + gx * ramp[None, :]
    noise = rng.normal(0.0, 12.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return base + gradient[..., None] + noise


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, cx: float, cy: float, r: float, angle: float,
                colour: tuple[int, int, int]) -> None:
    """Draw the class's shape of half-size r at (cx, cy), tilted by angle (a ring has no tilt)."""
    name = CLASSES[label]
    if name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(3, round(r * 0.4)))
        return
    if name == "square":
        pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.85
    elif name == "triangle":
        pts = np.array([(0, -1), (0.95, 0.75), (-0.95, 0.75)])
    else:  # cross: thin arms, so it reads as strokes rather than a block
        a, w = 1.0, 0.22
        pts = np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                        (-w, w), (-a, w), (-a, -w), (-w, -w)])
    c, s = np.cos(angle), np.sin(angle)
    draw.polygon([tuple(p) for p in pts @ np.array([[c, s], [-s, c]]) * r + (cx, cy)], fill=colour)


def make_image(rng: np.random.Generator, label: int, background: int) -> np.ndarray:
    """One HxWx3 uint8 image: class `label`'s shape on class `background`'s background.

    The shape's size, position, tilt and colour are random and independent of the class;
    its colour is a random bright tint, so it always stands out from the mid-tone background.
    """
    img = Image.fromarray(np.clip(_background(rng, background), 0, 255).astype(np.uint8))
    r = rng.uniform(0.3, 0.42) * IMAGE_SIZE / 2
    cx, cy = rng.uniform(_MARGIN + r, IMAGE_SIZE - _MARGIN - r, size=2)
    angle = rng.uniform(-np.pi / 36, np.pi / 36)
    colour = tuple(int(v) for v in rng.integers(185, 256, size=3))
    _draw_shape(ImageDraw.Draw(img), label, cx, cy, r, angle, colour)
    return np.asarray(img)


def _split_rng(split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, list(SPLITS).index(split)])


def write_split(root: str | Path, split: str, seed: int = 0) -> Path:
    """Write `split` as an ImageFolder tree root/<split>/<class>/<split>_<i>.png and return root/<split>.

    The per-image truth (label, background, aligned) goes to the sidecar root/<split>.json,
    outside the tree, so ImageFolder sees only class folders. Same seed, same bytes.
    """
    spec = SPLITS[split]
    root = Path(root)
    out = root / split
    (root / f"{split}.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    for name in CLASSES:
        (out / name).mkdir(parents=True)
    rng = _split_rng(split, seed)
    n = len(CLASSES)
    files = {}
    for i in range(spec.size):
        label = i % n
        aligned = bool(rng.random() < spec.p_aligned)
        background = label if aligned else int((label + rng.integers(1, n)) % n)
        rel = f"{CLASSES[label]}/{split}_{i:05d}.png"
        Image.fromarray(make_image(rng, label, background)).save(out / rel, compress_level=1)
        files[rel] = {"label": label, "background": background, "aligned": aligned}
    sidecar = {"generator_version": GENERATOR_VERSION, "seed": seed, "split": split,
               "classes": list(CLASSES), "files": files}
    # Written last: a sidecar on disk means the split is complete.
    (root / f"{split}.json").write_text(json.dumps(sidecar, indent=1))
    return out


def ensure_demo_data(root: str | Path, splits: tuple[str, ...] = ("scan", "aligned", "conflicting"),
                     seed: int = 0) -> dict[str, Path]:
    """Write the splits that are missing or stale under root; return {split: root/<split>}."""
    root = Path(root)
    paths = {}
    for split in splits:
        sidecar = root / f"{split}.json"
        try:
            meta = json.loads(sidecar.read_text())
            fresh = meta["generator_version"] == GENERATOR_VERSION and meta["seed"] == seed
        except (OSError, ValueError, KeyError):
            fresh = False
        paths[split] = root / split if fresh and (root / split).is_dir() else write_split(root, split, seed)
    return paths
