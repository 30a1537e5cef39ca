"""The second built-in benchmark: articulated, textured objects in textured scenes.

Harder than the shapes demo (data/demo.py) on both sides of the shortcut:

- the class is one of four composite objects (bird, fish, flower, mushroom), each built from
  several parts with its own articulation (wing flap, tail swing, legs or not, petal count, stem
  bend, cap height, ...), drawn at a random tilt, mirror, scale and position, with a dark contour,
  shaded by a random light and carrying its class's surface pattern (barred feathers, scales,
  radial veins, blotches) in its own frame. Its colour is only a hint: the body has its class's
  typical hue with chance P_TYPICAL_HUE (60%), else any hue, at random saturation and brightness.
  The demo's classes differ in area and stroke width, which a ViT reads at once; these differ in
  layout, pattern and a colour that often lies, so a tiny ViT from scratch needs several epochs
  to read them at all (without the colour hint it stayed at chance for 8 epochs of 4000 images);
- the background is a procedural scene from one of four families (sky with clouds, water with
  waves, meadow grass, leaf litter), each with random tint, scale and phase, and random clutter
  (pebbles, twigs, blotches) on top; the family covers most of the image and is read at once.

Each background family belongs to one class (bird-sky, fish-water, flower-meadow,
mushroom-leaves). In the `train` and `scan` splits `P_ALIGNED` of the images have their class's
background; `aligned` has 100%, `conflicting` 0% (each conflicting image gets one of the three
other families, uniformly). The object covers about 6% of the image (alike for every class) and is always fully
visible, so the task is learnable, but the background is the easier cue.

The module also makes the pretraining task of the shipped scenes model (cigma_ray/demo/scenes_train.py):
`PRETRAIN_OBJECTS` objects from random part blueprints (each with its own pattern and typical
hue, drawn like the benchmark's objects) that are not the benchmark's classes, on eight
background families (the benchmark's four and four others), the two labels drawn
independently, so features learned there know objects and backgrounds but not this shortcut.

    python -m cigma_ray.data.scenes --out DIR [--reduced] [--seed S] [--splits ...] [--grid PNG]

Only numpy and Pillow: the generator stays importable without torch.
"""
from __future__ import annotations

import argparse
import colorsys
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
# Sorted, so a class's index here is the index torchvision's ImageFolder gives its folder.
CLASSES: tuple[str, ...] = ("bird", "fish", "flower", "mushroom")
# Background families; the first four belong to CLASSES in order, the rest only appear in pretraining.
BACKGROUNDS: tuple[str, ...] = ("sky", "water", "meadow", "leaves", "brick", "wood", "marble", "tiles")
IMAGE_SIZE = 64
P_ALIGNED = 0.9
PRETRAIN_OBJECTS = 24  # blueprint classes of the pretraining task
_BLUEPRINT_SEED = 20260  # fixed: the pretraining classes are part of the generator's version
_SS = 2  # objects are drawn at 2x and averaged down (anti-aliased edges)
_OUTLINE = 2  # contour width in 2x pixels (0: none)
_TILT = 0.4  # radians either way
_SCALE = (10.5, 17.0)  # pixels per unit of an object's local frame: objects span about 21-34 px


@dataclass(frozen=True)
class Split:
    size: int  # images in total, balanced over the classes
    p_aligned: float  # chance an image's background is its own class's


SPLITS: dict[str, Split] = {
    "train": Split(6000, P_ALIGNED),
    "scan": Split(400, P_ALIGNED),
    "aligned": Split(400, 1.0),
    "conflicting": Split(400, 0.0),
}
# The reduced form for CI: the same images as the first images of each full split (same seed).
REDUCED_SPLITS: dict[str, Split] = {
    "train": Split(400, P_ALIGNED),
    "scan": Split(64, P_ALIGNED),
    "aligned": Split(64, 1.0),
    "conflicting": Split(64, 0.0),
}


# ---------------------------------------------------------------------------------------------
# colour and noise helpers

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def _noise(rng: np.random.Generator, cells: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random cells x cells grid, bicubic-upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((size + size // cells, size + size // cells), Image.BICUBIC)
    return np.clip(np.asarray(up)[:size, :size], 0.0, 1.0)


def _fbm(rng: np.random.Generator, octaves: tuple[int, ...] = (3, 6, 12), size: int = IMAGE_SIZE) -> np.ndarray:
    """Fractal noise in roughly [0, 1]: octaves of value noise, each half the weight of the last."""
    total = np.zeros((size, size), np.float32)
    weight = 1.0
    norm = 0.0
    for cells in octaves:
        total += weight * _noise(rng, cells, size)
        norm += weight
        weight *= 0.5
    return total / norm


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    return y, x


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 24,
                 start: float = 0.0, stop: float = 2 * np.pi) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=stop - start < 2 * np.pi - 1e-9)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + (cx, cy)


# ---------------------------------------------------------------------------------------------
# backgrounds: HxWx3 float arrays in [0, 255]

def _sky(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    hue = 0.58 + rng.uniform(-0.03, 0.03)
    top = _hsv(hue, rng.uniform(0.5, 0.8), rng.uniform(0.55, 0.8))
    bottom = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.15, 0.35), rng.uniform(0.85, 1.0))
    tilt = rng.uniform(-0.3, 0.3)
    t = np.clip((y + tilt * (x - 32)) / IMAGE_SIZE, 0, 1)[..., None]
    img = top * (1 - t) + bottom * t
    clouds = _fbm(rng, (3, 6, 12, 24))
    cover = np.clip((clouds - rng.uniform(0.42, 0.58)) / 0.12, 0, 1)[..., None]
    shade = 0.8 + 0.2 * _noise(rng, 8)[..., None]
    cloud = _hsv(hue, rng.uniform(0.0, 0.12), rng.uniform(0.88, 1.0)) * shade
    return img * (1 - 0.92 * cover) + cloud * 0.92 * cover


def _water(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    hue = 0.52 + rng.uniform(-0.04, 0.04)
    deep = _hsv(hue, rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.5))
    light = _hsv(hue - 0.02, rng.uniform(0.3, 0.55), rng.uniform(0.65, 0.85))
    freq = rng.uniform(0.09, 0.16)
    phase = 2 * np.pi * (freq * y + rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * (x / rng.uniform(20, 40))
                                                                    + rng.uniform(0, 2 * np.pi)) * 0.25
                         + 0.8 * _noise(rng, 4))
    wave = (0.5 + 0.5 * np.sin(phase)) ** 2
    depth = np.clip(y / IMAGE_SIZE * rng.uniform(0.2, 0.5), 0, 1)
    img = deep * (1 - wave[..., None]) + light * wave[..., None]
    img = img * (1 - 0.4 * depth[..., None])
    glint = ((wave > 0.93) & (_noise(rng, 16) > 0.6)).astype(np.float32)[..., None]
    return img * (1 - glint) + 245.0 * glint


def _meadow(rng: np.random.Generator) -> np.ndarray:
    hue = 0.27 + rng.uniform(-0.04, 0.04)
    base = _hsv(hue, rng.uniform(0.6, 0.85), rng.uniform(0.22, 0.38))
    img = Image.fromarray(np.clip(base * (0.8 + 0.4 * _fbm(rng)[..., None]), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(140, 220))
    xs, ys = rng.uniform(-2, IMAGE_SIZE + 2, n), rng.uniform(0, IMAGE_SIZE + 12, n)
    lengths, tilts = rng.uniform(6, 16, n), rng.normal(0, 0.3, n)
    for i in range(n):
        c = _hsv(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.45, 0.9), rng.uniform(0.3, 0.85))
        x1 = xs[i] + lengths[i] * np.sin(tilts[i])
        y1 = ys[i] - lengths[i] * np.cos(tilts[i])
        draw.line([(xs[i], ys[i]), (x1, y1)], fill=tuple(int(v) for v in c), width=1)
    return np.asarray(img).astype(np.float32)


def _leaves(rng: np.random.Generator) -> np.ndarray:
    hue = 0.07 + rng.uniform(-0.02, 0.02)
    base = _hsv(hue, rng.uniform(0.5, 0.75), rng.uniform(0.18, 0.3))
    img = Image.fromarray(np.clip(base * (0.7 + 0.6 * _fbm(rng)[..., None]), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(45, 80))):
        c = _hsv(rng.uniform(0.0, 0.13), rng.uniform(0.45, 0.9), rng.uniform(0.3, 0.8))
        cx, cy = rng.uniform(-4, IMAGE_SIZE + 4, 2)
        rx = rng.uniform(2.5, 6.0)
        pts = _ellipse_pts(cx, cy, rx, rx * rng.uniform(0.35, 0.55), rng.uniform(0, np.pi), n=10)
        draw.polygon([tuple(p) for p in pts], fill=tuple(int(v) for v in c))
    return np.asarray(img).astype(np.float32)


def _brick(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    h, w = rng.uniform(6, 10), rng.uniform(12, 20)
    oy, ox = rng.uniform(0, h), rng.uniform(0, w)
    row = np.floor((y + oy) / h)
    xs = x + ox + (row % 2) * w / 2  # alternate rows shifted by half a brick
    col = np.floor(xs / w)
    tint = np.sin((row * 97 + col * 13) * 12.9898) * 0.5 + 0.5  # per-brick variation
    brick = _hsv(rng.uniform(-0.02, 0.06), rng.uniform(0.55, 0.8), rng.uniform(0.45, 0.7))
    img = brick * (0.75 + 0.35 * tint[..., None]) * (0.85 + 0.3 * _noise(rng, 16)[..., None])
    mortar = ((y + oy) % h < 1.2) | (xs % w < 1.2)
    return np.where(mortar[..., None], _hsv(0.1, 0.1, rng.uniform(0.6, 0.8)), img)


def _wood(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    cx, cy = rng.uniform(-60, 120, 2)
    r = np.sqrt(((x - cx) * rng.uniform(0.2, 1.0)) ** 2 + (y - cy) ** 2)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * r / rng.uniform(4, 8) + 6 * _noise(rng, 4))
    hue = 0.08 + rng.uniform(-0.02, 0.02)
    dark = _hsv(hue, rng.uniform(0.6, 0.8), rng.uniform(0.3, 0.45))
    light = _hsv(hue + 0.01, rng.uniform(0.4, 0.6), rng.uniform(0.6, 0.8))
    return dark * (1 - rings[..., None]) + light * rings[..., None]


def _marble(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    a = rng.uniform(0, np.pi)
    u = x * np.cos(a) + y * np.sin(a)
    veins = np.abs(np.sin(2 * np.pi * u / rng.uniform(15, 30) + 8 * _fbm(rng))) ** 0.3
    hue = rng.uniform(0, 1)
    light = _hsv(hue, rng.uniform(0.0, 0.12), rng.uniform(0.75, 0.95))
    dark = _hsv(hue, rng.uniform(0.0, 0.2), rng.uniform(0.25, 0.45))
    return dark * (1 - veins[..., None]) + light * veins[..., None]


def _tiles(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    size = rng.uniform(7, 14)
    a, b = np.floor((x + rng.uniform(0, size)) / size), np.floor((y + rng.uniform(0, size)) / size)
    hue = rng.uniform(0, 1)
    c1 = _hsv(hue, rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.9))
    c2 = _hsv(hue + rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    check = ((a + b) % 2)[..., None]
    img = c1 * check + c2 * (1 - check)
    grout = (((x + rng.uniform(0, size)) % size) < 1) | (((y + rng.uniform(0, size)) % size) < 1)
    return np.where(grout[..., None], _hsv(0, 0, rng.uniform(0.2, 0.9)), img * (0.9 + 0.2 * _noise(rng, 8)[..., None]))


_BACKGROUND_MAKERS = (_sky, _water, _meadow, _leaves, _brick, _wood, _marble, _tiles)


def _clutter(rng: np.random.Generator, img: Image.Image) -> None:
    """0-4 small distractors of random colour (pebbles, twigs, blotches), independent of class and family."""
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 5))):
        c = tuple(int(v) for v in _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.8), rng.uniform(0.2, 0.95)))
        cx, cy = rng.uniform(0, IMAGE_SIZE, 2)
        kind = rng.integers(3)
        if kind == 0:  # pebble
            r = rng.uniform(1.5, 4.5)
            pts = _ellipse_pts(cx, cy, r, r * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), n=12)
            draw.polygon([tuple(p) for p in pts], fill=c)
        elif kind == 1:  # twig
            a, length = rng.uniform(0, np.pi), rng.uniform(6, 16)
            draw.line([(cx, cy), (cx + length * np.cos(a), cy + length * np.sin(a))], fill=c, width=int(rng.integers(1, 3)))
        else:  # blotch
            r = rng.uniform(3, 7)
            pts = _ellipse_pts(cx, cy, r, r * rng.uniform(0.3, 0.9), rng.uniform(0, np.pi), n=7)
            pts += rng.normal(0, r * 0.2, pts.shape)
            draw.polygon([tuple(p) for p in pts], fill=c)


def make_background(rng: np.random.Generator, family: int) -> np.ndarray:
    """One HxWx3 uint8 scene of background family `family` (an index into BACKGROUNDS), with clutter."""
    img = Image.fromarray(np.clip(_BACKGROUND_MAKERS[family](rng), 0, 255).astype(np.uint8))
    _clutter(rng, img)
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------
# objects: lists of parts in a local frame (unit ~ half the object's size, facing +x, y down).
# A part is ("poly", points, slot) or ("line", points, width, slot); slots index the palette:
# 1 body, 2 secondary, 3 dark accent, 4 light accent.

Part = tuple


def _rot(pts: np.ndarray, angle: float, about: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (np.asarray(pts, float) - about) @ np.array([[c, s], [-s, c]]) + about


def _bird(rng: np.random.Generator) -> list[Part]:
    tail_a = rng.uniform(-0.35, 0.35)
    tail = _rot([(-0.42, -0.02), (-0.98, -0.24), (-0.88, 0.0), (-0.98, 0.22)], tail_a, (-0.42, 0.0))
    flap = rng.uniform(-0.3, 1.2)  # wing angle about the shoulder: folded to raised
    shoulder = np.array([0.05, -0.08])
    wing = _rot(_ellipse_pts(-0.32, 0.0, 0.42, 0.14) + shoulder, flap, tuple(shoulder))
    parts: list[Part] = [("poly", tail, 2), ("poly", _ellipse_pts(0.0, 0.0, 0.52, 0.29, -0.12), 1)]
    if rng.random() < 0.5:  # perched: legs
        parts += [("line", [(0.0, 0.25), (-0.06, 0.55)], 0.06, 3), ("line", [(0.14, 0.24), (0.14, 0.55)], 0.06, 3)]
    head = np.array([0.5, -0.27])
    parts += [("poly", _ellipse_pts(*head, 0.21, 0.19), 1),
              ("poly", [(0.66, -0.33), (0.95, -0.25 + rng.uniform(-0.05, 0.05)), (0.66, -0.19)], 4),
              ("poly", wing, 2),
              ("poly", _ellipse_pts(0.55, -0.31, 0.055, 0.055, n=8), 3)]
    return parts


def _fish(rng: np.random.Generator) -> list[Part]:
    h = rng.uniform(0.24, 0.36)
    tail_a = rng.uniform(-0.45, 0.45)
    tail = _rot([(-0.5, 0.0), (-0.98, -0.38), (-0.84, 0.0), (-0.98, 0.38)], tail_a, (-0.5, 0.0))
    parts: list[Part] = [("poly", tail, 2),
                         ("poly", [(-0.28, -h + 0.04), (0.0, -h - 0.24), (0.22, -h + 0.02)], 2),  # dorsal fin
                         ("poly", [(-0.05, h - 0.04), (-0.2, h + 0.16), (0.12, h - 0.02)], 2),  # pelvic fin
                         ("poly", _ellipse_pts(0.0, 0.0, 0.62, h), 1),
                         ("line", [(0.3, -h * 0.75), (0.36, 0.0), (0.3, h * 0.75)], 0.05, 3),  # gill
                         ("poly", _ellipse_pts(0.44, -h * 0.25, 0.075, 0.075, n=8), 4),
                         ("poly", _ellipse_pts(0.45, -h * 0.25, 0.04, 0.04, n=6), 3)]
    return parts


def _flower(rng: np.random.Generator) -> list[Part]:
    parts: list[Part] = []
    centre = np.array([0.0, 0.0])
    if rng.random() < 0.7:  # on a bent stem, with a leaf
        bend = rng.uniform(-0.3, 0.3)
        centre = np.array([0.0, -0.35])
        parts.append(("line", [(0.0, -0.3), (bend, 0.3), (bend * 0.5, 0.95)], 0.08, 2))
        side = rng.choice([-1.0, 1.0])
        parts.append(("poly", _ellipse_pts(bend * 0.8 + side * 0.18, 0.45, 0.2, 0.07, side * 0.5), 2))
    n = int(rng.integers(5, 8))
    length, width = rng.uniform(0.25, 0.32), rng.uniform(0.09, 0.12)
    phase = rng.uniform(0, 2 * np.pi)
    for i in range(n):
        a = phase + 2 * np.pi * i / n
        parts.append(("poly", _ellipse_pts(*(centre + 0.42 * np.array([np.cos(a), np.sin(a)])), length, width, -a), 1))
    parts.append(("poly", _ellipse_pts(*centre, 0.16, 0.16, n=12), 4))
    return parts


def _mushroom(rng: np.random.Generator) -> list[Part]:
    lean = rng.uniform(-0.15, 0.15)
    ry = rng.uniform(0.3, 0.55)
    cap = _ellipse_pts(0.0, 0.0, 0.62, ry, start=np.pi, stop=2 * np.pi, n=16)
    parts: list[Part] = [("poly", [(-0.13, -0.05), (0.13, -0.05), (0.2 + lean, 0.65), (-0.2 + lean, 0.65)], 2),
                         ("poly", _ellipse_pts(0.0, 0.0, 0.6, 0.07), 3),  # gills
                         ("poly", cap, 1)]
    for _ in range(int(rng.integers(0, 6))):
        a = rng.uniform(np.pi * 1.15, np.pi * 1.85)
        r = rng.uniform(0.3, 0.75)
        parts.append(("poly", _ellipse_pts(0.62 * r * np.cos(a), ry * r * np.sin(a), 0.07, 0.06, n=8), 4))
    return parts


_OBJECT_MAKERS = (_bird, _fish, _flower, _mushroom)


@functools.lru_cache(maxsize=1)
def _blueprints() -> list[list[dict]]:
    """PRETRAIN_OBJECTS random part layouts, fixed by _BLUEPRINT_SEED: the pretraining classes."""
    rng = np.random.default_rng(_BLUEPRINT_SEED)
    prints = []
    for _ in range(PRETRAIN_OBJECTS):
        parts = []
        for j in range(int(rng.integers(3, 7))):
            kind = int(rng.integers(3)) if j else 0  # 0 ellipse, 1 polygon, 2 limb (thick line)
            out = rng.uniform(0, 2 * np.pi)  # parts sit around the body, pointing outwards
            centre = rng.uniform(0.35, 0.7) * np.array([np.cos(out), np.sin(out)]) if j else np.zeros(2)
            size = ((rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.5)) if j == 0
                    else (rng.uniform(0.15, 0.42), rng.uniform(0.08, 0.3)))
            verts = int(rng.integers(3, 7))
            parts.append(dict(kind=kind, centre=centre, size=size, verts=verts, jitter=rng.uniform(0.7, 1.3, verts),
                              angle=rng.uniform(0, np.pi) if j == 0 or kind != 2 else out + rng.uniform(-0.4, 0.4),
                              slot=1 if j == 0 else int(rng.integers(1, 5)), swing=rng.uniform(0.0, 0.4),
                              texture=TEXTURES[int(rng.integers(len(TEXTURES)))], hue=rng.uniform(0, 1)))
        prints.append(parts)
    return prints


def _blueprint_object(rng: np.random.Generator, cls: int) -> list[Part]:
    parts: list[Part] = []
    for p in _blueprints()[cls]:
        swing = rng.uniform(-p["swing"], p["swing"])  # articulation about the object's centre
        centre = _rot(p["centre"][None] + rng.normal(0, 0.03, 2), swing)[0]
        sx, sy = (s * rng.uniform(0.9, 1.1) for s in p["size"])
        angle = p["angle"] + swing
        if p["kind"] == 0:
            pts = _ellipse_pts(*centre, sx, sy, angle)
        elif p["kind"] == 1:
            t = np.linspace(0, 2 * np.pi, p["verts"], endpoint=False)
            pts = _rot(np.stack([sx * p["jitter"] * np.cos(t), sy * p["jitter"] * np.sin(t)], 1), angle) + centre
        else:
            d = np.array([np.cos(angle), np.sin(angle)]) * sx
            parts.append(("line", [tuple(centre - d), tuple(centre + d)], max(0.06, sy * 0.4), p["slot"]))
            continue
        parts.append(("poly", pts, p["slot"]))
    return parts


def _palette(rng: np.random.Generator, hue: float) -> np.ndarray:
    """Slot colours (0 unused): body, secondary, dark accent, light accent. The body's hue is near the
    object's typical `hue` with chance P_TYPICAL_HUE, else anywhere on the wheel."""
    h = hue + rng.uniform(-0.07, 0.07) if rng.random() < P_TYPICAL_HUE else rng.uniform(0, 1)
    sat, val = rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0)
    body = _hsv(h, sat, val)
    second = _hsv(h + rng.uniform(-0.08, 0.08), sat, val * rng.uniform(0.55, 0.8))  # a darker tone of the body
    dark = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.6), rng.uniform(0.05, 0.25))
    light = _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.9), rng.uniform(0.75, 1.0))
    return np.stack([np.zeros(3), body, second, dark, light])


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-square, as two passes of shifted maxima."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        for k in range(1, r + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(k, None), slice(None, -k)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


TEXTURES: tuple[str, ...] = ("bars", "scales", "rays", "spots", "plain", "mottled")
# The benchmark classes' own surface patterns (a bird's barred feathers, a fish's scales, a flower's
# radial petal veins, a mushroom's blotches), drawn in a random colour.
CLASS_TEXTURES: tuple[str, ...] = ("bars", "scales", "rays", "spots")
# Their typical body hues (red birds, yellow fish, magenta flowers, violet mushrooms), away from the
# background families' hues; an object has its class's hue with chance P_TYPICAL_HUE.
CLASS_HUES: tuple[float, ...] = (0.0, 0.16, 0.86, 0.72)
P_TYPICAL_HUE = 0.6


def _texture(rng: np.random.Generator, kind: str, lu: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """A brightness multiplier from texture `kind`, at local object coordinates (lu, lv)."""
    amp = rng.uniform(0.3, 0.45)
    if kind == "bars":  # bands across the body, about 3 px apart
        return 1 - amp * (np.sin(2 * np.pi * lu / rng.uniform(0.2, 0.26)) > 0.2)
    if kind == "scales":  # a staggered lattice of dark dots
        p = rng.uniform(0.17, 0.22)
        row = np.floor(lv / p)
        fu = (lu / p + 0.5 * (row % 2)) % 1.0 - 0.5
        fv = (lv / p) % 1.0 - 0.5
        return 1 - amp * (fu * fu + fv * fv < 0.09)
    if kind == "rays":  # veins radiating from the object's centre
        return 1 - amp * (np.sin(int(rng.integers(10, 16)) * np.arctan2(lv, lu)) > 0.3)
    if kind == "spots":  # large light blotches
        return 1 + amp * (_noise(rng, 10, lu.shape[0]) > 0.6)
    if kind == "mottled":
        return 1 - amp + 2 * amp * _noise(rng, 8, lu.shape[0])
    return np.ones_like(lu)


def _render(rng: np.random.Generator, parts: list[Part], bg: np.ndarray, texture: str,
            hue: float) -> tuple[np.ndarray, np.ndarray]:
    """Composite the parts onto bg (HxWx3 uint8) at a random pose, scale and position, shaded and textured.

    Returns the image and the object's coverage of each pixel (HxW float32 in [0, 1])."""
    size = IMAGE_SIZE * _SS
    scale = rng.uniform(*_SCALE) * _SS  # pixels per local unit: the object spans about 2 * scale
    angle = rng.uniform(-_TILT, _TILT)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    margin = 1.05 * scale
    centre = rng.uniform(margin, size - margin, 2)

    def place(pts) -> list[tuple[float, float]]:
        p = np.asarray(pts, float) * (flip, 1.0)
        return [tuple(q) for q in _rot(p, angle) * scale + centre]

    slots = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(slots)
    for part in parts:
        if part[0] == "poly":
            draw.polygon(place(part[1]), fill=part[2])
        else:
            draw.line(place(part[1]), fill=part[3], width=max(1, round(part[2] * scale)), joint="curve")
    slot = np.asarray(slots)
    rgb = _palette(rng, hue)[slot]

    # light from a random direction across the object, and its surface texture on body and secondary parts,
    # laid out in the object's own frame (it turns and mirrors with the object)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (x - centre[0]) / scale, (y - centre[1]) / scale
    la = rng.uniform(0, 2 * np.pi)
    shade = np.clip(0.95 + 0.3 * (u * np.cos(la) + v * np.sin(la)) - 0.12 * (u * u + v * v), 0.45, 1.25)
    c, s = np.cos(angle), np.sin(angle)
    tex = _texture(rng, texture, flip * (u * c + v * s), -u * s + v * c)
    textured = (slot == 1) | (slot == 2)
    rgb = rgb * shade[..., None] * np.where(textured, tex, 1.0)[..., None]

    alpha = (slot > 0).astype(np.float32)
    if _OUTLINE:  # a dark contour, about 1 px at the final size, so the silhouette reads on any scene
        grown = _dilate(slot > 0, _OUTLINE)
        ring = grown & (slot == 0)
        rgb[ring] = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.0, 0.15))
        alpha = grown.astype(np.float32)
    # average the 2x layer down: premultiplied colour and coverage
    pre = (rgb * alpha[..., None]).reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS, 3).mean((1, 3))
    cover = alpha.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean((1, 3))[..., None]
    return np.clip(bg.astype(np.float32) * (1 - cover) + pre, 0, 255).astype(np.uint8), cover[..., 0]


def make_image(rng: np.random.Generator, label: int, background: int) -> np.ndarray:
    """One HxWx3 uint8 image: class `label`'s object on a scene of background family `background`."""
    bg = make_background(rng, background)
    return _render(rng, _OBJECT_MAKERS[label](rng), bg, CLASS_TEXTURES[label], CLASS_HUES[label])[0]


def make_pretrain_image(rng: np.random.Generator, obj: int, background: int) -> tuple[np.ndarray, np.ndarray]:
    """One image of the pretraining task, blueprint object `obj` (< PRETRAIN_OBJECTS) on family `background`
    (< 8), and the object's coverage of each pixel (HxW float32 in [0, 1])."""
    bg = make_background(rng, background)
    return _render(rng, _blueprint_object(rng, obj), bg, _blueprints()[obj][0]["texture"],
                   _blueprints()[obj][0]["hue"])


def pretrain_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n pretraining images (N x H x W x 3 uint8), their object labels, background labels and object coverage
    (N x H x W uint8, 255 = fully covered).

    Both labels are balanced and independent of each other: object i % PRETRAIN_OBJECTS, background
    drawn uniformly from all of BACKGROUNDS. None of the objects is a benchmark class.
    """
    rng = np.random.default_rng([seed, 1000])
    objs = np.arange(n) % PRETRAIN_OBJECTS
    bgs = rng.integers(0, len(BACKGROUNDS), n)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    cover = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, (o, b) in enumerate(zip(objs, bgs)):
        image, c = make_pretrain_image(rng, int(o), int(b))
        images[i], cover[i] = image, np.round(c * 255)
    return images, objs, bgs, cover


# ---------------------------------------------------------------------------------------------
# splits on disk

def _split_rng(split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, list(SPLITS).index(split)])


def split_spec(split: str, reduced: bool = False) -> Split:
    return (REDUCED_SPLITS if reduced else SPLITS)[split]


def split_plan(split: str, seed: int = 0, reduced: bool = False) -> list[tuple[int, int]]:
    """(label, background family) of every image of a split, without drawing any: labels cycle over the
    classes; an image is aligned with chance p_aligned, else gets one of the other families uniformly.
    A reduced split's plan is the start of the full one's."""
    spec = split_spec(split, reduced)
    rng = _split_rng(split, seed)
    n = len(CLASSES)
    plan = []
    for i in range(spec.size):
        label = i % n
        aligned = bool(rng.random() < spec.p_aligned)
        plan.append((label, label if aligned else int((label + rng.integers(1, n)) % n)))
    return plan


def _image_rng(split: str, seed: int, index: int) -> np.random.Generator:
    # one stream per image, so image i does not depend on the images before or after it
    return np.random.default_rng([seed, list(SPLITS).index(split), index])


def render_split_image(split: str, index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Image `index` of a split exactly as written, with the truth: (image, object coverage of each pixel
    (HxW float32 in [0, 1]), label, background family). For checking masks against the real object."""
    label, background = split_plan(split, seed)[index]
    rng = _image_rng(split, seed, index)
    bg = make_background(rng, background)
    image, cover = _render(rng, _OBJECT_MAKERS[label](rng), bg, CLASS_TEXTURES[label], CLASS_HUES[label])
    return image, cover, label, background


def write_split(root: str | Path, split: str, seed: int = 0, reduced: bool = False) -> Path:
    """Write `split` as an ImageFolder tree root/<split>/<class>/<split>_<i>.png and return root/<split>.

    The per-image truth (label, background, aligned) goes to the sidecar root/<split>.json,
    outside the tree, so ImageFolder sees only class folders. Same seed, same bytes; a reduced
    split holds the first images of the full one.
    """
    spec = split_spec(split, reduced)
    root = Path(root)
    out = root / split
    (root / f"{split}.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    for name in CLASSES:
        (out / name).mkdir(parents=True)
    files = {}
    for i, (label, background) in enumerate(split_plan(split, seed, reduced)):
        rel = f"{CLASSES[label]}/{split}_{i:05d}.png"
        Image.fromarray(make_image(_image_rng(split, seed, i), label, background)).save(out / rel, compress_level=1)
        files[rel] = {"label": label, "background": background, "aligned": label == background}
    sidecar = {"generator_version": GENERATOR_VERSION, "seed": seed, "split": split, "reduced": reduced,
               "p_aligned": spec.p_aligned, "classes": list(CLASSES),
               "backgrounds": list(BACKGROUNDS[:len(CLASSES)]), "files": files}
    # Written last: a sidecar on disk means the split is complete.
    (root / f"{split}.json").write_text(json.dumps(sidecar, indent=1))
    return out


def ensure_scenes_data(root: str | Path, splits: tuple[str, ...] = ("scan", "aligned", "conflicting"),
                       seed: int = 0, reduced: bool = False) -> dict[str, Path]:
    """Write the splits that are missing or stale under root; return {split: root/<split>}.

    A split is stale when its sidecar names another generator version, seed or size (reduced or not).
    """
    root = Path(root)
    paths = {}
    for split in splits:
        sidecar = root / f"{split}.json"
        try:
            meta = json.loads(sidecar.read_text())
            fresh = (meta["generator_version"] == GENERATOR_VERSION and meta["seed"] == seed
                     and meta["reduced"] == reduced)
        except (OSError, ValueError, KeyError):
            fresh = False
        paths[split] = root / split if fresh and (root / split).is_dir() else write_split(root, split, seed, reduced)
    return paths


def sample_grid(seed: int = 0, per_cell: int = 2) -> np.ndarray:
    """A picture of the benchmark: rows are classes, column pairs are background families (the diagonal is aligned).

    Each cell holds `per_cell` images side by side, with a 2 px gap; returns an HxWx3 uint8 array.
    """
    n, gap = len(CLASSES), 2
    cell = per_cell * IMAGE_SIZE + (per_cell - 1) * gap
    out = np.full((n * (IMAGE_SIZE + gap) + gap, n * (cell + 3 * gap) + gap, 3), 255, np.uint8)
    for label in range(n):
        for bg in range(n):
            for k in range(per_cell):
                rng = np.random.default_rng([seed, 99, label, bg, k])
                y = gap + label * (IMAGE_SIZE + gap)
                x = gap + bg * (cell + 3 * gap) + k * (IMAGE_SIZE + gap)
                out[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE] = make_image(rng, label, bg)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the scenes benchmark as ImageFolder splits.")
    parser.add_argument("--out", type=Path, required=True, help="root folder; each split goes to OUT/<split>")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduced", action="store_true", help="the small form for CI (%s)" %
                        ", ".join(f"{k} {v.size}" for k, v in REDUCED_SPLITS.items()))
    parser.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG here (rows: classes; "
                        "column groups: background families; the diagonal is aligned)")
    args = parser.parse_args(argv)
    for split, path in ensure_scenes_data(args.out, tuple(args.splits), args.seed, args.reduced).items():
        print(f"{split}: {path} ({split_spec(split, args.reduced).size} images)")
    if args.grid:
        grid = Image.fromarray(sample_grid(args.seed, per_cell=3))
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.grid)
        print(f"sample grid: {args.grid}")


if __name__ == "__main__":
    main()
