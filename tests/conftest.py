"""Shared fixtures, in one place: generated image folders, a small checkpoint, and a finished run of it."""
from __future__ import annotations

import pytest
import torch

from cigma_ray.config import Config

from helpers import VIT_KINDS, finished_run, perturb, write_folder

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "folder", per_class=10, broken=("a/zz_broken.png",))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A perturbed 3-class tiny ViT saved as a plain state dict: (path, model name, kwargs)."""
    import timm

    name, kwargs = VIT_KINDS["vit"]
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, num_classes=3, **kwargs))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return str(path), name, kwargs


@pytest.fixture(scope="session")
def scored_run(tmp_path_factory, image_folder, tiny_checkpoint):
    """The tiny checkpoint scanned on image_folder, ranked by bir_drop with every score beside it: its run directory."""
    cfg = Config(tp_ratio=0.4, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=100, top_k=2, batch_size=8,
                 score="bir_drop")
    return finished_run(tmp_path_factory.mktemp("scores") / "run", image_folder, tiny_checkpoint, cfg).job.out


@pytest.fixture(scope="session")
def fast_run_dir(tmp_path_factory, image_folder, tiny_checkpoint):
    """The tiny checkpoint scanned with helpers.FAST (several units per stage): its run directory, to copy, never
    to change."""
    from helpers import FAST

    return finished_run(tmp_path_factory.mktemp("fast") / "run", image_folder, tiny_checkpoint, FAST).job.out
