"""`cigma-ray export`: the zeroed checkpoint loads in plain timm and equals the keep-mask ablation;
the smaller model equals the zeroed one with fewer parameters; bad requests exit 2 with a named error."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.cli import main
from cigma_ray.config import Config
from cigma_ray.engine import Replica
from cigma_ray.models import ModelError, ModelSpec, load
from cigma_ray.models.surgery import (
    attentions_of,
    load_smaller,
    parameters,
    plain_timm_model,
    smaller_model,
    zeroed_state_dict,
)
from cigma_ray.pipeline import Job, Pipeline
from cigma_ray.rundir import RunDir, top_heads

from helpers import cli, perturb

FAST = Config(tp_ratio=0.8, mask_steps=4, mask_batch=4, unit_images=4, bootstrap=50, top_k=3, batch_size=8)




def ablated_logits(lm, x: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """The scan's own ablation: per-layer keep-masks on the heads' outputs."""
    replica = Replica(lm)
    return replica.logits(x, replica.keep_without(heads))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, image_folder, tiny_checkpoint):
    """A real (tiny) scan with rankings, of a checkpoint file of its own."""
    root = tmp_path_factory.mktemp("export")
    path, name, kwargs = tiny_checkpoint
    checkpoint = str(root / "weights.pth")
    shutil.copy(path, checkpoint)
    job = Job(model=ModelSpec(f"timm:{name}", checkpoint=checkpoint, model_kwargs=kwargs), data=image_folder,
              out=str(root / "run"), config=FAST)
    Pipeline(job, progress=False).run_all()
    return job


def unranked_run(run_dir, tmp_path) -> str:
    """A run directory that has its run.json but was never ranked."""
    path = tmp_path / "unranked"
    path.mkdir()
    shutil.copy(RunDir(run_dir.out).path("run.json"), path / "run.json")
    return str(path)




def test_export_of_a_real_run_loads_in_plain_timm(run_dir, tmp_path, capsys):
    out, small_path = str(tmp_path / "pruned.pth"), str(tmp_path / "small.pt")
    assert main(["export", run_dir.out, "--out", out, "--smaller", small_path]) == 0
    printed = capsys.readouterr().out
    assert "removed 3 heads (top 3 of rankings.parquet by big_drop)" in printed and "load_smaller" in printed

    info = json.load(open(out + ".json"))
    heads = top_heads(RunDir(run_dir.out).read_table("rankings.parquet"), FAST.top_k)
    assert [(r["layer"], r["head"]) for r in info["removed_heads"]] == heads
    assert all(r["score"] is not None for r in info["removed_heads"])
    assert info["source"]["run"] == run_dir.out and info["num_classes"] == 3

    scope: dict = {}
    exec(info["load"], scope)  # the sidecar's own snippet: plain timm, no cigma_ray
    zeroed = scope["model"]
    lm = load(run_dir.model)
    x = torch.randn(4, 3, *lm.adapter.input_size)
    small = load_smaller(small_path)
    with torch.inference_mode():
        got_zeroed, got_small = zeroed(x), small(x)
    torch.testing.assert_close(got_zeroed, ablated_logits(lm, x, heads), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_small, got_zeroed, rtol=0, atol=1e-5)
    assert info["smaller"]["parameters"] == parameters(small) < info["parameters"] == parameters(zeroed)


def test_named_heads_with_a_whole_layer_as_safetensors(run_dir, tmp_path):
    out, small_path = str(tmp_path / "pruned.safetensors"), str(tmp_path / "small.pt")
    assert main(["export", run_dir.out, "--heads", "0.0,0.1,0.2,2.1", "--out", out, "--smaller", small_path]) == 0
    info = json.load(open(out + ".json"))
    assert info["selection"] == "--heads" and info["smaller"]["heads_per_layer"] == [0, 3, 2]
    scope: dict = {}
    exec(info["load"], scope)
    lm = load(run_dir.model)
    x = torch.randn(2, 3, *lm.adapter.input_size)
    heads = [(0, 0), (0, 1), (0, 2), (2, 1)]
    with torch.inference_mode():
        torch.testing.assert_close(scope["model"](x), ablated_logits(lm, x, heads), rtol=0, atol=1e-5)
        torch.testing.assert_close(load_smaller(small_path)(x), scope["model"](x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--k", "10"], "--k=10: the model has 9 heads"),
    (["--heads", "3.0"], "head 3.0 does not exist"),
    (["--heads", "0.1,0.1"], "named twice"),
    (["--heads", "first"], "LAYER.HEAD"),
    ("unranked", "has no rankings.parquet yet"),
    ("not a run", "not a run directory"),
])
def test_bad_requests_exit_2_with_a_named_error(run_dir, tmp_path, capsys, args, message):
    run = run_dir.out
    if args == "unranked":
        run, args = unranked_run(run_dir, tmp_path), []
    elif args == "not a run":
        run, args = str(tmp_path), []
    out = tmp_path / "pruned.pth"
    assert main(["export", run, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "cigma-ray export: error:" in err and message in err
    if message.startswith("has no rankings"):
        assert run in err and "cigma-ray scan" in err
    assert not out.exists()


def test_changed_weights_are_refused(run_dir, tmp_path, capsys):
    changed = tmp_path / "changed.pth"
    state = torch.load(run_dir.model.checkpoint, weights_only=True)
    state["head.bias"] += 1
    torch.save(state, changed)
    assert main(["export", run_dir.out, "--out", str(tmp_path / "p.pth"), "--checkpoint", str(changed)]) == 2
    assert "not the ones" in capsys.readouterr().err


def test_smaller_is_refused_for_other_models_but_zeroing_works():
    lm = load(ModelSpec("timm:swin_tiny_patch4_window7_224", random_weights=True, num_classes=4,
                        model_kwargs=dict(img_size=32, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 3))))
    perturb(lm.adapter.model)
    heads = [(1, 1)]
    with pytest.raises(ModelError, match=r"zeroed-weights checkpoint \(--out without --smaller\) works"):
        smaller_model(lm.adapter.model, heads)
    x = torch.randn(2, 3, 32, 32)
    zeroed = plain_timm_model("swin_tiny_patch4_window7_224", 4, dict(img_size=32, window_size=4, embed_dim=24,
                              depths=(1, 1), num_heads=(2, 3)), zeroed_state_dict(attentions_of(lm), lm.adapter.model, heads))
    with torch.inference_mode():
        torch.testing.assert_close(zeroed(x), ablated_logits(lm, x, heads), rtol=0, atol=1e-5)


def test_export_by_another_score(scored_run, tmp_path):
    out = str(tmp_path / "pruned.pth")
    proc = cli("export", scored_run, "--k", "2", "--score", "big_minus_fig", "--out", out)
    ranking = pq.read_table(os.path.join(scored_run, "rankings.parquet")).sort_by("big_minus_fig_rank").slice(0, 2)
    named = " ".join(f"{r['layer']}.{r['head']}" for r in ranking.to_pylist())
    assert f"(top 2 of rankings.parquet by big_minus_fig): {named}" in proc.stdout
    info = json.loads(open(out + ".json").read())
    assert [(r["layer"], r["head"]) for r in info["removed_heads"]] == [
        (r["layer"], r["head"]) for r in ranking.to_pylist()]
