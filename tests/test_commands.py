"""The `cigma-ray` command end to end, as a user runs it (a real subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.cli import main
from cigma_ray.commands import COMMANDS, load_command
from cigma_ray.data import open_source
from cigma_ray.engine.reference import scan_by_weight_zeroing
from cigma_ray.method import counterfactuals, head_scores
from cigma_ray.models import ModelSpec, load
from cigma_ray.models.attention import find_attentions
from cigma_ray.rundir import RunDir

from helpers import cli, model_args, write_folder


def test_scan_random_vit_tiny_equals_weight_zeroing(tmp_path):
    """The issue's acceptance check: a random-weight timm:vit_tiny_patch16_224 at its own 224 px."""
    data = write_folder(tmp_path / "data", per_class=5, size=48)
    (tmp_path / "c.yaml").write_text("tp_ratio: 1.0\nmask_steps: 3\nmask_batch: 4\nunit_images: 3\nbootstrap: 100\ntop_k: 5\n")
    out = str(tmp_path / "run")
    proc = cli("scan", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--num-classes", "3",
                 "--data", data, "--out", out, "--config", str(tmp_path / "c.yaml"))
    assert "top 5 heads" in proc.stdout
    assert "scan" in proc.stderr and "pair/s" in proc.stderr  # progress bars

    lm = load(ModelSpec("timm:vit_tiny_patch16_224", random_weights=True, num_classes=3))
    model = lm.adapter.model
    run = RunDir(out)
    masks = run.read_folder("masks").sort_by("image_id")
    src = open_source(data)
    images, _, _ = src.load([src.records[i] for i in masks["image_id"].to_pylist()], lm.transform)
    assert images.shape[-1] == 224
    fg = torch.from_numpy(np.stack(masks["fg"].to_numpy(zero_copy_only=False))).reshape(-1, 32, 32)
    no_bg, _ = counterfactuals(images, fg)
    ablated = scan_by_weight_zeroing(model, find_attentions(model), images, no_bg, lm.adapter.heads).big.numpy()
    expected = head_scores(masks["big"].to_numpy()[None, :] - ablated, bootstrap=100, seed=0)
    ranking = pq.read_table(os.path.join(out, "rankings.parquet"))
    by_head = ranking.sort_by([("layer", "ascending"), ("head", "ascending")])
    np.testing.assert_allclose(by_head["score"].to_numpy(), expected["score"], rtol=1e-4, atol=1e-7)  # fp32 rounding: |diff| ~2e-8
    order = np.argsort(-expected["score"], kind="stable")
    assert ranking["layer"].to_pylist()[:5] == [lm.adapter.heads[i][0] for i in order[:5]]
    assert ranking["head"].to_pylist()[:5] == [lm.adapter.heads[i][1] for i in order[:5]]

    shown = cli("show", out, "--top", "3")
    assert "top 3 heads" in shown.stdout and "95% CI" in shown.stdout


def test_scan_with_checkpoint_and_model_kwargs_then_resume(tmp_path, tiny_checkpoint, image_folder):
    path, name, kwargs = tiny_checkpoint
    out = str(tmp_path / "run")
    (tmp_path / "c.yaml").write_text("mask_steps: 2\nunit_images: 4\nbootstrap: 50\ntop_k: 3\n")
    args = ["scan", "--model", f"timm:{name}", "--checkpoint", path, "--model-kwargs", *model_args(kwargs),
            "--data", image_folder, "--out", out, "--config", str(tmp_path / "c.yaml"), "--quiet"]
    first = cli(*args)
    assert "1 image could not be read" in first.stdout
    before = pq.read_table(os.path.join(out, "rankings.parquet"))
    second = cli(*args)
    assert second.stderr == ""  # nothing left to do, so no progress bars
    assert pq.read_table(os.path.join(out, "rankings.parquet")).equals(before)


@pytest.mark.parametrize("args, message", [
    (["--model", "timm:vit_tiny_patch16_224", "--random-weights", "--num-classes", "3", "--config", "{tmp}/missing.yaml"],
     "config file .* does not exist"),
    (["--model", "resnet50", "--random-weights"], "unknown model family"),
    (["--model", "timm:vit_tiny_patch16_224", "--checkpoint", "{tmp}/nope.pth"], "file not found"),
    (["--model", "timm:vit_tiny_patch16_224", "--random-weights"], "has 3 classes but .* outputs 1000"),
    (["--model", "timm:vit_tiny_patch16_224", "--random-weights", "--model-kwargs", "depth"], "key=value"),
    (["--model", "timm:vit_tiny_patch16_224", "--random-weights", "--device", "cuda"], "CUDA is not available"),
    (["--model", "timm:vit_tiny_patch16_224", "--num-classes", "3"], "pretrained weights"),
])
def test_bad_input_exits_2_with_a_named_error(tmp_path, args, message):
    import re

    data = write_folder(tmp_path / "data", per_class=1)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = cli("scan", *args, "--data", data, "--out", str(tmp_path / "run"), check=False)
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_show_on_something_that_is_not_a_run(tmp_path):
    proc = cli("show", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_data_errors_from_the_cli(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("scan", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "no images found" in proc.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_registered_command_parses_and_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"] if name != "cluster" else [name, "render", "--help"])
    assert exit_.value.code == 0 and "usage: cigma-ray" in capsys.readouterr().out
    module = load_command(name)
    assert callable(module.add_arguments) and callable(module.settings) and callable(module.run)


def test_the_parser_imports_only_the_command_that_runs():
    code = ("import sys\nfrom cigma_ray.cli import build_parser\nbuild_parser('show')\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('cigma_ray.commands.'))\n"
            "assert loaded == ['cigma_ray.commands.options', 'cigma_ray.commands.show'], loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
