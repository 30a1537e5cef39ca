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


# -- bad input: every kind a message and exit 2, checked before what it need not wait for ---------------------
# stage: "parse" (argparse: usage, exit 2), "settings" (the arguments alone: before any data, model or storage is
# touched), "listing" (the data or run directory read, before the model loads), "model" (needs the model built or
# its checkpoint read). Never is a Ray cluster started or anything written.
SCAN = "scan --model timm:{arch} --checkpoint {ckpt} --model-kwargs {kwargs} --data {data} --out {out}"
RANDOM = "scan --model timm:vit_tiny_patch16_224 --random-weights --num-classes 3 --data {data} --out {out}"
YAML = {
    'config-not-yaml': 'a: [1, 2',
    'config-a-list': '- 1',
    'config-unknown-key': 'maks_steps: 3',
    'config-out-of-range': 'tp_ratio: 0',
    'config-infinite': 'mask_lr: .inf',
    'config-wrong-type': 'mask_steps: many',
    'out-other-settings': 'tp_ratio: 0.5\ntop_k: 3',
    'top-k-above-heads': 'top_k: 10',
}  # the config file of a case (--config {yaml})
BAD_INPUT = [
    # the config file
    ("config-missing", SCAN + " --config {tmp}/missing.yaml", r"config file .*missing.yaml does not exist", "settings"),
    ("config-png", SCAN + " --config {png}", r"is not a text file \(not UTF-8\)", "settings"),
    ("config-directory", SCAN + " --config {tmp}", r"is a directory", "settings"),
    ("config-not-yaml", SCAN + " --config {yaml}", r"is not valid YAML", "settings"),
    ("config-a-list", SCAN + " --config {yaml}", r"must be a mapping", "settings"),
    ("config-unknown-key", SCAN + " --config {yaml}", r"unknown key\(s\) maks_steps", "settings"),
    ("config-out-of-range", SCAN + " --config {yaml}", r"tp_ratio=0.0 .*\(a fraction in \(0, 1\]\)", "settings"),
    ("config-infinite", SCAN + " --config {yaml}", r"not finite: mask_lr=inf", "settings"),
    ("config-wrong-type", SCAN + " --config {yaml}", r"mask_steps='many' must be int", "settings"),
    ("rounds-0", SCAN + " --rounds 0", r"rounds=0", "settings"),
    ("k-per-round-word", SCAN + " --k-per-round two", r"invalid int value: 'two'", "parse"),
    # the model
    ("model-no-family", "scan --model resnet50 --random-weights --data {data} --out {out}", r"unknown model family", "settings"),
    ("model-unknown-arch", "scan --model timm:vit_tinny --random-weights --data {data} --out {out}",
     r"timm has no model 'vit_tinny'; similar names", "settings"),
    ("checkpoint-missing", SCAN.replace("{ckpt}", "{tmp}/nope.pth"), r"--checkpoint .*nope.pth: file not found", "settings"),
    ("checkpoint-directory", SCAN.replace("{ckpt}", "{tmp}"), r"--checkpoint .*: is a directory", "settings"),
    ("checkpoint-unreadable", SCAN.replace("{ckpt}", "{png}"), r"cannot be read as a PyTorch or safetensors", "model"),
    ("checkpoint-other-architecture", SCAN.replace("{ckpt}", "{shallow}"),
     r"12 of the model's weights are missing from it \(first: blocks.2.norm1.weight\)\. The checkpoint looks like a "
     r"ViT with 2 blocks of width 48.*--model-kwargs depth=2", "model"),
    ("checkpoint-other-classes", SCAN + " --num-classes 5",
     r"shapes differ \(first: head.weight, \[3, 48\] in the checkpoint, \[5, 48\].*--num-classes 3", "model"),
    ("model-kwargs-no-value", RANDOM + " --model-kwargs depth", r"write key=value", "settings"),
    ("model-kwargs-wrong-type", RANDOM + " --model-kwargs depth=abc",
     r"--model-kwargs depth=abc: VisionTransformer's depth takes int \(default 12\), not the str 'abc'", "settings"),
    ("model-kwargs-unknown", RANDOM + " --model-kwargs depht=3", r"failed with --model-kwargs/--img-size depht=3: "
     r"TypeError: .*unexpected keyword argument 'depht'", "model"),
    ("img-size-0", RANDOM + " --img-size 0", r"--img-size 0: the input size in pixels, a size of at least 1", "settings"),
    ("num-classes-negative", RANDOM.replace("--num-classes 3", "--num-classes -1"), r"--num-classes -1: .*at least 1",
     "settings"),
    ("classes-vs-model", "scan --model timm:vit_tiny_patch16_224 --random-weights --data {data} --out {out}",
     r"has 3 classes but .* outputs 1000; pass --num-classes 3", "model"),
    ("device-gpu", SCAN + " --device gpu", r"--device 'gpu': use cpu or cuda\[:N\]", "settings"),
    ("device-cuda-absent", SCAN + " --device cuda", r"CUDA is not available here; use --device cpu", "settings"),
    ("precision-fp16", SCAN + " --precision fp16", r"invalid choice: 'fp16'", "parse"),
    # the data
    ("data-missing", SCAN.replace("{data}", "{tmp}/nothing"), r"--data .*nothing: does not exist", "listing"),
    ("data-empty", SCAN.replace("{data}", "{empty}"), r"no images found", "listing"),
    ("data-not-parquet", SCAN.replace("{data}", "{csv}"), r"a file must be a .parquet table", "listing"),
    ("data-parquet-columns", SCAN.replace("{data}", "{columns}"), r"needs an encoded-image column", "listing"),
    ("data-more-classes", SCAN.replace("{data}", "{four}"), r"has 4 classes but .* outputs 3", "model"),
    # the run directory
    ("out-is-data", SCAN.replace("{out}", "{data}"), r"--out .* is --data .*choose an --out outside", "settings"),
    ("out-inside-data", SCAN.replace("{out}", "{data}/run"), r"is inside --data .*choose an --out outside", "settings"),
    ("out-inside-data-s3", "scan --model timm:vit_tiny_patch16_224 --random-weights --data s3://b/images --out "
     "s3://b/images/run", r"is inside --data s3://b/images", "settings"),
    ("out-a-file", SCAN.replace("{out}", "{png}"), r"--out .* is an existing file; a run is a directory", "settings"),
    ("out-unknown-scheme", SCAN.replace("{out}", "nosuch://x/run"), r"--out nosuch://x/run: Protocol not known", "settings"),
    ("out-other-settings", SCAN.replace("{out}", "{run}") + " --config {yaml}",
     r"already holds a run with other settings:\n  tp_ratio: run has 0.8, this command 0.5", "model"),
    ("top-k-above-heads", SCAN + " --config {yaml}", r"top_k=10: the model has 9 heads", "model"),
    ("rounds-remove-everything", SCAN + " --rounds 5 --k-per-round 3", r"would remove 12 of the 9 heads", "model"),
    # where it runs
    ("address-malformed", SCAN + " --address nowhere", r"--address 'nowhere': use local, auto, HOST:PORT", "settings"),
    ("address-nobody-listens", SCAN + " --address 127.0.0.1:{closed_port}", r"cannot connect.*ray start --head", "settings"),
    ("replicas-0", SCAN + " --address local --replicas 0", r"--replicas 0: model replicas, a count of at least 1", "settings"),
    ("cpus-per-replica-nan", SCAN + " --address local --cpus-per-replica nan", r"--cpus-per-replica nan: give a number",
     "settings"),
    ("gpus-per-replica-negative", SCAN + " --address local --gpus-per-replica -1", r"--gpus-per-replica -1.0: give a number",
     "settings"),
    # a finished run
    ("show-not-a-run", "show {tmp}", r"is not a run directory \(no run.json\)", "listing"),
    ("show-top-negative", "show {run} --top -2", r"--top -2: heads to print, a count of at least 1", "settings"),
    ("show-unknown-score", "show {run} --score fig", r"--scores 'fig': this run can rank by", "listing"),
    ("show-unranked", "show {unranked}", r"has no rankings.parquet yet, so there are no top heads to show", "listing"),
    ("show-truncated-rankings", "show {truncated}", r"rankings.parquet is damaged .*not a whole Parquet file", "listing"),
    ("status-not-a-run", "status {tmp}/nothing", r"is not a run directory", "listing"),
    ("export-out-a-directory", "export {run} --out {tmp}", r"--out .*: is a directory; give the file to write", "settings"),
    ("export-smaller-is-out", "export {run} --out {tmp}/a.pth --smaller {tmp}/a.pth", r"--smaller .* is the --out file",
     "settings"),
    ("export-k-0", "export {run} --out {tmp}/a.pth --k 0", r"--k=0: the model has 9 heads; choose K from 1 to 9", "listing"),
    ("export-heads-absent", "export {run} --out {tmp}/a.pth --heads 9.9", r"head 9.9 does not exist", "listing"),
    ("prune-k-above-heads", "prune {run} --k 100", r"--k=100: the model has 9 heads", "listing"),
    ("prune-run-inside-eval-data", "prune {data}/run --eval-data {data}", r"the run directory .* is inside --eval-data",
     "settings"),
    ("prune-eval-data-missing", "prune {run} --eval-data {tmp}/nothing", r"--eval-data .*nothing: does not exist", "listing"),
    ("prune-eval-data-classes", "prune {run} --eval-data {four}", r"named classes must be the same ones", "listing"),
    ("prune-mask-images-0", "prune {run} --mask-images 0", r"--mask-images and --random-seeds must be at least 1",
     "settings"),
    ("prune-auto-k-with-k", "prune {run} --auto-k --k 2", r"--auto-k chooses K itself", "settings"),
    ("prune-max-clean-drop", "prune {run} --auto-k --max-clean-drop 2", r"--max-clean-drop 2.0: a fraction", "settings"),
    ("prune-unknown-score", "prune {run} --scores nope", r"--scores 'nope': this run can rank by", "listing"),
    ("prune-checkpoint-missing", "prune {run} --checkpoint {tmp}/nope.pth", r"file not found", "settings"),
    ("prune-device-gpu", "prune {run} --device gpu", r"--device 'gpu': use cpu or cuda", "settings"),
    ("sweep-k-words", "sweep {run} --k four", r"write K values separated by commas", "settings"),
    ("sweep-k-above-heads", "sweep {run} --k 0,40", r"--k=40: the model has 9 heads", "listing"),
    ("report-images-negative", "report {run} --images -1", r"--images -1: give a count of 0 or more", "settings"),
    ("export-changed-weights", "export {run} --out {tmp}/a.pth --checkpoint {shallow}", r"not the ones .* scanned|does not fit",
     "model"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_checkpoint, fast_run_dir):
    """What the bad inputs name: data, files of the wrong kind, a shallower checkpoint, runs finished, unranked, damaged."""
    import shutil
    import socket

    import pyarrow as pa
    import timm

    from helpers import VIT_KINDS, perturb

    tmp = tmp_path_factory.mktemp("bad")
    path, arch, kwargs = tiny_checkpoint
    name, shallow_kwargs = VIT_KINDS["vit"]
    shallow = perturb(timm.create_model(name, pretrained=False, num_classes=3, **{**shallow_kwargs, "depth": 2}))
    torch.save(shallow.state_dict(), tmp / "shallow.pth")
    (tmp / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    (tmp / "empty").mkdir()
    (tmp / "table.csv").write_text("image,label\n")
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), tmp / "columns.parquet")
    run = tmp / "run"
    shutil.copytree(fast_run_dir, run)
    (tmp / "unranked").mkdir()
    shutil.copy(run / "run.json", tmp / "unranked" / "run.json")
    shutil.copytree(fast_run_dir, tmp / "truncated")
    with open(tmp / "truncated" / "rankings.parquet", "r+b") as f:
        f.truncate(100)
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    return {"tmp": str(tmp), "arch": arch, "ckpt": path, "kwargs": " ".join(model_args(kwargs)),
            "data": write_folder(tmp / "data", per_class=1), "four": write_folder(tmp / "four", classes="abcd", per_class=1),
            "png": str(tmp / "image.png"), "shallow": str(tmp / "shallow.pth"), "empty": str(tmp / "empty"),
            "csv": str(tmp / "table.csv"), "columns": str(tmp / "columns.parquet"), "run": str(run),
            "unranked": str(tmp / "unranked"), "truncated": str(tmp / "truncated"), "closed_port": str(closed_port)}


def snapshot(root: str) -> dict:
    """Every file under root with its size and modification time (to see that nothing was written)."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("case, command, message, stage", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_named_error_before_any_work(case, command, message, stage, bad_inputs, tmp_path, monkeypatch,
                                                    capsys):
    """Every kind of bad input: exit 2 and a message of one or two lines naming the input and the fix, no traceback;
    nothing written, no Ray cluster started, and no model built unless the check needs it."""
    import re

    import ray

    from cigma_ray.models import registry

    if case == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    values = {**bad_inputs, "out": str(tmp_path / "out"), "yaml": str(tmp_path / "c.yaml")}
    (tmp_path / "c.yaml").write_text(YAML.get(case, "") + "\n")
    argv = []
    for word in command.split(" "):
        argv += bad_inputs["kwargs"].split(" ") if word == "{kwargs}" else [word.format(**values)]
    events = []
    loaders = dict(registry.LOADERS)

    def watched(family):
        def load(*args, **kwargs):
            events.append("model")
            return loaders[family](*args, **kwargs)
        load.describes = getattr(loaders[family], "describes", False)
        return load

    monkeypatch.setattr(registry, "LOADERS", {family: watched(family) for family in loaders})
    monkeypatch.setattr(ray, "init", lambda *a, **k: events.append("ray") or (_ for _ in ()).throw(AssertionError("ray.init")))
    before = snapshot(bad_inputs["tmp"])
    if stage == "parse":
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        code = exit_.value.code
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    if stage not in ("parse",) and case != "out-other-settings":  # (that one lists every difference, a line each)
        assert len(err.strip().splitlines()) <= 2, err
    assert "ray" not in events
    assert ("model" in events) == (stage == "model"), events
    assert not os.path.exists(values["out"]) and snapshot(bad_inputs["tmp"]) == before


def test_a_png_config_and_a_truncated_file_print_no_traceback(tmp_path, fast_run_dir):
    """Two of the table's inputs through the real command (a subprocess): the message, and no traceback."""
    import shutil

    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    proc = cli("scan", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--data", str(tmp_path),
               "--out", str(tmp_path / "run"), "--config", str(png), check=False)
    assert proc.returncode == 2 and "is not a text file" in proc.stderr and "Traceback" not in proc.stderr
    shutil.copytree(fast_run_dir, tmp_path / "copy")
    deltas = sorted((tmp_path / "copy" / "deltas").iterdir())[0]
    deltas.write_bytes(deltas.read_bytes()[:50])
    proc = cli("status", str(tmp_path / "copy"))
    assert f"damaged  deltas/{deltas.name}: checksum mismatch" in proc.stdout and "Traceback" not in proc.stderr


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
