"""Test helpers: tiny random timm models with informative outputs, generated image data, and where the
published-format InternVL2 fixture lives."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cigma_ray.config import Config

# Small ViT family members: name -> kwargs for timm.create_model (all 32 px inputs).
VIT_KINDS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)),
    "vit_avg": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                             global_pool="avg", class_token=False, fc_norm=True)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=7, embed_dim=48, depth=3, num_heads=3,
                                                         init_values=0.5)),
}

# ../shared/internvl_chat: a tiny InternVL2 checkpoint in the published `internvl_chat` format and the published
# code (MIT) as the oracle; its README says how it was made. Tests that need it skip where it is not.
INTERNVL_CHAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "internvl_chat")
if not os.path.isdir(INTERNVL_CHAT):
    INTERNVL_CHAT = "/work/shared/internvl_chat"
INTERNVL2, INTERNVL2_5 = (os.path.join(INTERNVL_CHAT, n) for n in ("tiny_internvl_chat_shimmed",
                                                                    "tiny_internvl2_5_chat_shimmed"))
INTERNVL2_PUBLISHED = os.path.join(INTERNVL_CHAT, "tiny_internvl_chat")  # the code unmodified
needs_internvl_chat = pytest.mark.skipif(not os.path.isdir(INTERNVL2),
                                         reason="../shared/internvl_chat (the oracle) is not here")


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Random init makes near-uniform outputs; adding noise makes every head matter visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def write_folder(root, classes=("a", "b", "c"), per_class=6, size=32, seed=0, broken=()):
    """An ImageFolder tree of class-tinted noise images; `broken` names files written as garbage."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
            img[..., k % 3] = img[..., k % 3] * 0.5 + 127
            Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, c, f"{i:03d}.png"))
    for rel in broken:
        with open(os.path.join(root, rel), "wb") as f:
            f.write(b"this is not an image")
    return str(root)


def model_args(kwargs: dict) -> list[str]:
    """CLI --model-kwargs values for a kwargs dict."""
    return [f"{k}={v}" for k, v in kwargs.items()]


# A fast config for runs of the tiny checkpoint: few mask steps, small units, 200 bootstrap resamples.
# measure_swap on: the shared runs carry every score (swap_drop too), so the commands are tested on all of them
FAST = Config(tp_ratio=0.8, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=200, top_k=3, batch_size=8,
              measure_swap=True)


def job(tmp_path, folder: str, checkpoint: tuple, name: str = "run", cfg=None, **kw):
    """The Job of a scan of the tiny checkpoint (conftest's tiny_checkpoint) on `folder`, into tmp_path/name."""
    from cigma_ray.models import ModelSpec
    from cigma_ray.pipeline import Job

    path, model, kwargs = checkpoint
    spec = ModelSpec(f"timm:{model}", checkpoint=path, model_kwargs=kwargs)
    return Job(model=spec, data=folder, out=str(tmp_path / name), config=cfg or FAST, **kw)


def rankings(run_dir: str):
    """rankings.parquet of a local run directory."""
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(run_dir, "rankings.parquet"))


def finished_run(out: str, data: str, checkpoint: tuple, config):
    """A tiny timm run (the conftest's tiny_checkpoint) scanned and ranked in this process; its Pipeline."""
    from cigma_ray.models import ModelSpec
    from cigma_ray.pipeline import Job, Pipeline

    path, name, kwargs = checkpoint
    spec = ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)
    pipeline = Pipeline(Job(model=spec, data=data, out=str(out), config=config), progress=False)
    pipeline.run_all()
    return pipeline


def cli(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """`cigma-ray ARGS` as a user runs it: a real subprocess, offline; with `check`, exit 0 is asserted."""
    proc = subprocess.run([sys.executable, "-m", "cigma_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def interrupt_when(args: list[str], folder: str, sig: int, files: int = 1, timeout: float = 900,
                   env: dict | None = None) -> subprocess.CompletedProcess | None:
    """Run `cigma-ray ARGS` and send it `sig` as soon as `folder` holds `files` finished unit files (polled every
    few milliseconds); returns the finished process (exit code, output), or None when it ended before that."""
    import signal as signals
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cigma_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or {**os.environ, "HF_HUB_OFFLINE": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            names = os.listdir(folder) if os.path.isdir(folder) else []
            if sum(n.endswith(".parquet") and not n.startswith(".") for n in names) >= files:
                proc.send_signal(sig)
                out, err = proc.communicate(timeout=120)
                return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            time.sleep(0.003)
        if proc.poll() is None:
            raise AssertionError(f"cigma-ray {args[0]} did not reach {folder} in {timeout} s")
        proc.communicate()
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signals.SIGKILL)
            proc.wait()


def labelled_folder(root, spec, n: int = 24, size: int = 32, seed: int = 1) -> str:
    """Noise images filed under the class the model `spec` predicts with a clear margin (integer folders), so
    every image is classified correctly (in D) whatever the thread count (no near-tie can flip)."""
    import shutil

    from cigma_ray.data import open_source
    from cigma_ray.models import load

    root = str(root)
    staging = write_folder(root + "_staging", classes=("x",), per_class=n, size=size, seed=seed)
    source = open_source(staging)
    loaded = load(spec)
    images, records, _ = source.load(source.records, loaded.transform)
    with torch.no_grad():
        logits = loaded.adapter.model(images)
    top2 = logits.topk(2, dim=1).values
    for record, pred, margin in zip(records, logits.argmax(1).tolist(), (top2[:, 0] - top2[:, 1]).tolist()):
        if margin > 1e-3:
            os.makedirs(os.path.join(root, str(pred)), exist_ok=True)
            shutil.copy(record.path, os.path.join(root, str(pred), os.path.basename(record.path)))
    shutil.rmtree(staging)
    return root
