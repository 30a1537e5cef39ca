"""Shared fixtures, in one place: generated image folders, a small checkpoint, and a finished run of it."""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: the tests start subprocesses (CLI runs, Ray replicas) that
# share the cores, and spinning threads made torch 10-100x slower on a busy 2-core machine. Set before torch
# loads its OpenMP runtime; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from cigma_ray.config import Config  # noqa: E402

from helpers import VIT_KINDS, finished_run, perturb, write_folder  # noqa: E402

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
                 score="bir_drop", measure_swap=True)
    return finished_run(tmp_path_factory.mktemp("scores") / "run", image_folder, tiny_checkpoint, cfg).job.out


@pytest.fixture(scope="session")
def fast_run_dir(tmp_path_factory, image_folder, tiny_checkpoint):
    """The tiny checkpoint scanned with helpers.FAST (several units per stage): its run directory, to copy, never
    to change."""
    from helpers import FAST

    return finished_run(tmp_path_factory.mktemp("fast") / "run", image_folder, tiny_checkpoint, FAST).job.out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a machine
    shared by several jobs, two threads per process made small fits many times slower (results do not depend
    on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
