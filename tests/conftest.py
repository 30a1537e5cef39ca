"""Shared fixtures: generated image folders and a small checkpoint."""
from __future__ import annotations

import pytest
import torch

from helpers import VIT_KINDS, perturb, write_folder

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
