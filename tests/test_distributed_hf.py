"""`cigma-ray scan` on tiny CLIP, LLaVA and InternVL through the distributed path (Ray, `--address local`).

Class names come from the data's folder names; two share their first word, so the VLMs score
whole token sequences. The LLaVA run scans the language model's heads too and is compared with
the same job run in this process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from cigma_ray.config import Config  # noqa: E402
from cigma_ray.models import ModelSpec  # noqa: E402
from cigma_ray.pipeline import Job, Pipeline  # noqa: E402

from helpers import write_folder  # noqa: E402
from hf_tiny import SAVERS  # noqa: E402
from ray_cluster import ray_env  # noqa: E402

CLASSES = ("cat", "red bus", "red car")
FAST = Config(tp_ratio=1.0, mask_steps=3, mask_batch=4, unit_images=4, bootstrap=20, top_k=3, batch_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("hfdata") / "images", classes=CLASSES, per_class=3)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind, heads", [("clip", "vision"), ("llava", "vision+text"), ("internvl", "vision")])
def test_scan_on_ray_ranks_every_head(tmp_path, data, kind, heads):
    model = SAVERS[kind](str(tmp_path / kind))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(FAST.to_dict()))
    out = str(tmp_path / "run")
    ray_tmp = tempfile.mkdtemp(prefix="cgr", dir="/tmp")  # short: Ray's unix sockets live there
    try:
        proc = subprocess.run([sys.executable, "-m", "cigma_ray.cli", "scan", "--model", f"hf:{model}", "--heads", heads,
                               "--data", data, "--out", out, "--config", str(config), "--address", "local",
                               "--replicas", "2", "--quiet"], env=ray_env(RAY_TMPDIR=ray_tmp), capture_output=True,
                              text=True, timeout=280)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.load(open(os.path.join(out, "run.json")))
    labels = meta["model"]["layer_labels"]
    assert labels == (["vision.0", "vision.1"] + (["text.0", "text.1"] if heads != "vision" else []))
    assert meta["model"]["options"]["classes"] == list(CLASSES)  # from the data's class folders
    assert meta["precision"] == "fp32"  # no --precision, a cluster without GPUs: the exact default
    assert re.search(r"^name +rank", proc.stdout, re.M) and re.search(r"^(vision|text)\.\d\.\d ", proc.stdout, re.M)
    rankings = pq.read_table(os.path.join(out, "rankings.parquet"))
    skipped = [1] if kind == "llava" else []  # LLaVA reads vision layer 0's output (-2): layer 1 is not scanned
    assert meta["plan"].get("skipped_layers", []) == skipped and list(map(int, meta["model"]["skipped_layers"])) == skipped
    assert rankings.num_rows == 4 * (len(labels) - len(skipped)) and np.isfinite(rankings["score"].to_numpy()).all()
    assert not set(rankings["layer"].to_pylist()) & set(skipped)
    # what `show` prints (the scan prints it too): which layers were not scanned, and why
    said = re.findall(r"^skipped +layers? (.*)$", proc.stdout, re.M)
    assert said == (["vision.1 (4 heads, not scanned or ranked): vision_feature_layer -2: the language model reads "
                     "the vision tower's hidden state after its layer 0, so the heads of the layers above it cannot "
                     "change the logits"] if kind == "llava" else []), proc.stdout
    if kind != "llava":
        return
    # the same job in this process gives the same ranking
    spec = ModelSpec(f"hf:{model}", heads=heads)
    local = Pipeline(Job(model=spec, data=data, out=str(tmp_path / "local"), config=FAST), progress=False)
    local.run_all()
    want = pq.read_table(str(tmp_path / "local" / "rankings.parquet"))
    # the scores agree to float rounding (thread counts differ): compare head by head
    got, want = (t.sort_by([("layer", "ascending"), ("head", "ascending")]) for t in (rankings, want))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-6)
    assert got["layer"].to_pylist() == want["layer"].to_pylist()


@pytest.mark.timeout(120)
def test_an_hf_model_defaults_to_bf16_where_its_replicas_get_gpus(monkeypatch):
    """No --precision: bf16 for an hf: model whose replicas run on GPUs (a cluster with GPUs and no
    --gpus-per-replica, or --gpus-per-replica >= 1, or --device cuda), fp32 otherwise and for timm models.
    The cluster here declares one GPU it does not have: only its resources are read."""
    import ray

    from cigma_ray.commands.options import ModelOptions, ScanOptions
    from cigma_ray.commands.scan import Settings, replica_precision

    def precision(model="hf:/models/x", address="local", gpus=None, device=None, given=None):
        scan = ScanOptions(model=ModelOptions(model=model), data="d", out="o", device=device, precision=given)
        settings = Settings(scan=scan, config=Config(), address=address, gpus_per_replica=gpus)
        return replica_precision(settings, scan.model.spec(0))

    assert precision(address=None) == "fp32" and precision(address=None, device="cuda") == "bf16"
    assert precision(address=None, device="cuda", given="fp32") == "fp32"
    assert precision(gpus=1) == "bf16" and precision(gpus=0) == "fp32"
    assert precision(model="timm:vit_tiny_patch16_224", gpus=1) == "fp32"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert precision() == "bf16"  # replicas get the cluster's GPUs by default
        assert precision(gpus=0) == "fp32" and precision(given="fp32") == "fp32"
    finally:
        ray.shutdown()
