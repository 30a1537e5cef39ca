"""The second built-in benchmark (articulated objects in textured scenes) and its shipped model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cigma_ray.data import scenes
from cigma_ray.data.scenes import (
    BACKGROUNDS,
    CLASSES,
    GENERATOR_VERSION,
    REDUCED_SPLITS,
    SPLITS,
    ensure_scenes_data,
    make_image,
    make_pretrain_image,
    split_plan,
)

ASSETS = Path(scenes.__file__).parent.parent / "assets"


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = ensure_scenes_data(tmp_path / "a", splits=("aligned",), reduced=True)["aligned"]
    b = ensure_scenes_data(tmp_path / "b", splits=("aligned",), reduced=True)["aligned"]
    c = ensure_scenes_data(tmp_path / "c", splits=("aligned",), seed=1, reduced=True)["aligned"]
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == REDUCED_SPLITS["aligned"].size
    assert sorted(os.listdir(a)) == sorted(CLASSES)  # ImageFolder layout, sidecar outside the tree
    assert all((a / rel).read_bytes() == (b / rel).read_bytes() for rel in files)
    assert all((a / rel).read_bytes() != (c / rel).read_bytes() for rel in files)


def test_every_split_is_balanced_with_its_stated_alignment_rate():
    for split, spec in SPLITS.items():
        plan = split_plan(split)
        assert len(plan) == spec.size
        labels = np.array([label for label, _ in plan])
        backgrounds = np.array([bg for _, bg in plan])
        assert np.bincount(labels, minlength=len(CLASSES)).tolist() == [spec.size // len(CLASSES)] * len(CLASSES)
        assert set(backgrounds.tolist()) <= set(range(len(CLASSES)))
        rate = float(np.mean(labels == backgrounds))
        if spec.p_aligned in (0.0, 1.0):
            assert rate == spec.p_aligned
        else:  # binomial: 4 standard errors
            assert abs(rate - spec.p_aligned) < 4 * np.sqrt(spec.p_aligned * (1 - spec.p_aligned) / spec.size)
        if spec.p_aligned < 1.0:  # a misaligned image gets each other family about equally often
            counts = np.bincount((backgrounds - labels)[labels != backgrounds] % len(CLASSES), minlength=4)[1:]
            assert counts.min() > 0.6 * counts.mean()
    assert abs(np.mean([a == b for a, b in split_plan("train")]) - SPLITS["train"].p_aligned) < 0.02


def test_reduced_form_is_small_and_the_start_of_the_full_one(tmp_path):
    assert sum(s.size for s in REDUCED_SPLITS.values()) <= 600
    for split in SPLITS:
        assert split_plan(split, reduced=True) == split_plan(split)[:REDUCED_SPLITS[split].size]
        assert REDUCED_SPLITS[split].size % len(CLASSES) == 0
    out = ensure_scenes_data(tmp_path, splits=("conflicting",), reduced=True)["conflicting"]
    meta = json.loads((tmp_path / "conflicting.json").read_text())
    assert meta["generator_version"] == GENERATOR_VERSION and meta["reduced"] is True
    assert not any(f["aligned"] for f in meta["files"].values())
    assert sum(f.stat().st_size for f in out.rglob("*.png")) < 2_000_000


def test_ensure_regenerates_only_what_is_missing_or_stale(tmp_path):
    paths = ensure_scenes_data(tmp_path, splits=("scan", "aligned"), reduced=True)
    first = next(paths["scan"].rglob("*.png"))
    stamp = first.stat().st_mtime_ns
    ensure_scenes_data(tmp_path, splits=("scan", "aligned"), reduced=True)
    assert first.stat().st_mtime_ns == stamp  # fresh: untouched
    sidecar = tmp_path / "scan.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "generator_version": GENERATOR_VERSION - 1}))
    ensure_scenes_data(tmp_path, splits=("scan",), reduced=True)
    assert json.loads(sidecar.read_text())["generator_version"] == GENERATOR_VERSION
    meta = json.loads((tmp_path / "aligned.json").read_text())  # a full split where a reduced one is asked for
    (tmp_path / "aligned.json").write_text(json.dumps({**meta, "reduced": False}))
    ensure_scenes_data(tmp_path, splits=("aligned",), reduced=True)
    assert json.loads((tmp_path / "aligned.json").read_text())["reduced"] is True


def test_the_truth_of_an_image_can_be_rendered_again(tmp_path):
    folder = ensure_scenes_data(tmp_path, splits=("conflicting",), reduced=True)["conflicting"]
    from PIL import Image

    for i in (0, 5):
        image, cover, label, background = scenes.render_split_image("conflicting", i)
        on_disk = np.asarray(Image.open(folder / CLASSES[label] / f"conflicting_{i:05d}.png"))
        assert np.array_equal(image, on_disk) and label != background
        assert cover.shape == (64, 64) and 0.01 < cover.mean() < 0.3


def test_images_and_pretraining_task():
    img = make_image(np.random.default_rng(0), 0, 1)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # the object is drawn over the scene: images differ from the bare background with the same stream
    bare = scenes.make_background(np.random.default_rng(0), 1)
    assert np.abs(img.astype(int) - bare.astype(int)).sum() > 0
    for obj in (0, scenes.PRETRAIN_OBJECTS - 1):
        for bg in (0, len(BACKGROUNDS) - 1):
            image, cover = make_pretrain_image(np.random.default_rng(1), obj, bg)
            assert image.shape == (64, 64, 3) and cover.shape == (64, 64) and 0.02 < cover.mean() < 0.5
    images, objs, bgs, cover = scenes.pretrain_arrays(48, seed=3)
    again = scenes.pretrain_arrays(48, seed=3)[0]
    assert images.shape == (48, 64, 64, 3) and np.array_equal(images, again) and cover.shape == (48, 64, 64)
    assert np.bincount(objs).tolist() == [2] * scenes.PRETRAIN_OBJECTS and bgs.max() < len(BACKGROUNDS)


def test_generator_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import importlib.util as u; "
            f"s = u.spec_from_file_location('scenes', {scenes.__file__!r}); m = u.module_from_spec(s); "
            "sys.modules['scenes'] = m; s.loader.exec_module(m); print(m.make_image(__import__('numpy').random.default_rng(0), 2, 3).shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "(64, 64, 3)" in proc.stdout


def test_shipped_model_loads_in_timm_and_reproduces_its_card(tmp_path):
    """The checkpoint is a plain fp32 timm state dict; on the reduced aligned and conflicting splits it gives
    exactly the card's reduced-split accuracies (up to one image, for float rounding on other CPUs), and
    those are within 0.15 of the card's full-split accuracies (64 images: about 2.5 binomial standard errors)."""
    import timm
    import torch

    from cigma_ray.demo.scenes_train import SCENES_MODEL_KWARGS, SCENES_MODEL_NAME, accuracy, load_split

    card = json.loads((ASSETS / "scenes_vit.json").read_text())
    assert card["model_name"] == SCENES_MODEL_NAME and card["model_kwargs"] == SCENES_MODEL_KWARGS
    assert card["generator_version"] == GENERATOR_VERSION and card["classes"] == list(CLASSES)
    state = torch.load(ASSETS / "scenes_vit.pth", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert (ASSETS / "scenes_vit.pth").stat().st_size < 3_000_000
    model = timm.create_model(card["model_name"], pretrained=False, **card["model_kwargs"])
    model.load_state_dict(state)
    torch.set_num_threads(1)
    paths = ensure_scenes_data(tmp_path, splits=("aligned", "conflicting"), reduced=True)
    for split, folder in paths.items():
        images, labels = load_split(folder)
        acc = accuracy(model, images, labels)
        assert abs(acc - card["accuracy_reduced"][split]) <= 1 / len(labels) + 1e-9, (split, acc)
        assert abs(acc - card["accuracy"][split]) <= 0.15, (split, acc)
    # the planted shortcut is there
    assert card["accuracy"]["aligned"] > card["accuracy"]["conflicting"] + 0.2
