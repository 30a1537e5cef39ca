"""Issue 7: score variants, measure_fig, top_k as a fraction, and choosing K under a clean-accuracy guard."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.config import Config, ConfigError, from_dict, resolve_k
from cigma_ray.engine import scan_heads
from cigma_ray.engine.reference import scan_by_weight_zeroing
from cigma_ray.method import counterfactuals, js, probs, score_terms
from cigma_ray.models import ModelSpec, load
from cigma_ray.models.timm_generic import find_attentions

from cigma_ray.prune import choose_pruning, default_k_grid

from helpers import VIT_KINDS, finished_run, model_args, perturb

FAST = Config(tp_ratio=0.8, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=100, top_k=2, batch_size=8)


def test_score_terms_match_their_definitions_by_hand():
    big, fig = np.array([0.2, 0.1, 0.0]), np.array([0.2, 0.3, 0.0])
    big_abl, fig_abl = np.array([[0.1, 0.1, 0.0], [0.0, 0.05, 0.1]]), np.array([[0.1, 0.1, 0.0], [0.0, 0.15, 0.1]])
    t = score_terms(big, big_abl, fig, fig_abl)
    np.testing.assert_allclose(t["big_drop"], [[0.1, 0.0, 0.0], [0.2, 0.05, -0.1]])
    # BIR 0.5, 0.25, undefined; ablated: 0.5, 0.5, undefined / undefined, 0.25, 0.5 -> undefined pairs count as 0
    np.testing.assert_allclose(t["bir_drop"], [[0.0, 0.25 - 0.5, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(t["big_minus_fig"], [[0.0, -0.2, 0.0], [0.0, -0.1, 0.0]])
    assert set(score_terms(big, big_abl)) == {"big_drop"}


def test_top_k_fractions_round_half_up_and_at_least_one():
    assert [resolve_k(0.02, n) for n in (1000, 72, 24, 100)] == [20, 1, 1, 2]
    assert resolve_k(0.025, 100) == 3 and resolve_k(0.015, 100) == 2  # 1.5 rounds up despite 0.015 * 100 < 1.5
    assert resolve_k(16, 1000) == 16 and Config(top_k=0.5).k_of(24) == 12
    assert from_dict({"top_k": 0.02}).top_k == 0.02 and from_dict({"top_k": 3}).top_k == 3
    with pytest.raises(ConfigError, match="has 24 heads"):
        resolve_k(25, 24)
    with pytest.raises(ConfigError, match="write a count as an integer"):
        from_dict({"top_k": 2.0})
    with pytest.raises(ConfigError, match="top_k"):
        from_dict({"top_k": 0})
    with pytest.raises(ConfigError, match="needs FIG"):
        from_dict({"score": "bir_drop", "measure_fig": False})
    with pytest.raises(ConfigError, match="score='paper'"):
        from_dict({"score": "paper"})
    with pytest.raises(ConfigError, match="must be bool"):
        from_dict({"measure_fig": 1})


@pytest.mark.parametrize("kind", ["vit", "deit_distilled"])
def test_scan_measures_fig_exactly_like_weight_zeroing(kind):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", model_kwargs=kwargs, random_weights=True, num_classes=4))
    perturb(lm.adapter.model)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fg = torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.6
    no_bg, no_fg = counterfactuals(images, fg)
    heads = lm.adapter.heads
    model = lm.adapter.model
    expected = scan_by_weight_zeroing(model, find_attentions(model), images, no_bg, heads, images_no_fg=no_fg)
    for batch_size in (3, 7, 64):
        got = scan_heads(lm.adapter, images, no_bg, heads, batch_size=batch_size, images_no_fg=no_fg)
        torch.testing.assert_close(got.big, expected.big, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.fig, expected.fig, rtol=0, atol=1e-5)
    assert scan_heads(lm.adapter, images, no_bg, heads).fig is None
    # FIG^(-h) is JS(q^(-h)(I), q^(-h)(I_-fg)): with the head kept it is the intact FIG
    with torch.no_grad():
        intact = js(probs(model(images)), probs(model(no_fg)))
    assert not torch.allclose(expected.fig, intact.expand_as(expected.fig), atol=1e-4)


def tempting_rows():
    """big_drop lowers BIR most but breaks the guard; bir_drop lowers it less within it; big_minus_fig collapses."""
    def row(control, k, acc, bir, collapsed=False, seed=None):
        return {"control": control, "k": k, "seed": seed, "heads": "", "accuracy": acc, "bir_mean": bir,
                "collapsed": collapsed}
    return [row("intact", 0, 1.0, 0.30),
            row("big_drop", 1, 0.97, 0.10), row("big_drop", 2, 0.60, 0.05),
            row("bir_drop", 1, 0.995, 0.25), row("bir_drop", 2, 0.985, 0.20), row("bir_drop", 4, 0.979, 0.21),
            row("big_minus_fig", 1, 0.99, 0.31), row("big_minus_fig", 2, 0.25, 0.01, collapsed=True),
            row("random", 2, 0.99, 0.02, seed=0)]


def test_choose_pruning_respects_the_clean_accuracy_guard():
    chosen, judged = choose_pruning(tempting_rows(), 0.02)
    assert (chosen["control"], chosen["k"]) == ("bir_drop", 2)  # not big_drop K=1 (BIR 0.10, drop 0.03)
    verdicts = {(j["control"], j["k"]): j["verdict"] for j in judged}
    assert verdicts[("big_drop", 1)].startswith("clean accuracy drop 0.030 > 0.02")
    assert verdicts[("big_minus_fig", 2)] == "collapsed"
    assert verdicts[("big_minus_fig", 1)] == "does not lower BIR"
    assert ("random", 2) not in verdicts  # a control is never chosen
    assert all(j["clean_drop"] <= 0.02 for j in judged if j["verdict"] in ("chosen", "within guard"))
    # a looser guard lets the tempting one through; a strict one leaves nothing
    assert (choose_pruning(tempting_rows(), 0.05)[0]["control"], choose_pruning(tempting_rows(), 0.05)[0]["k"]) == ("big_drop", 1)
    assert choose_pruning(tempting_rows(), 0.001)[0] is None


def test_default_k_grid():
    assert default_k_grid(24) == [1, 2, 4, 8] and default_k_grid(72) == [1, 2, 4, 8, 16, 32]
    assert default_k_grid(1) == [1] and default_k_grid(2) == [1]


def cigma(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "cigma_ray.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, image_folder, tiny_checkpoint):
    return finished_run(tmp_path_factory.mktemp("scores") / "run", image_folder, tiny_checkpoint,
                        FAST.replace(tp_ratio=0.4, score="bir_drop")).job.out


def test_show_names_the_score_and_the_others(scored_run):
    shown = cigma("show", scored_run).stdout
    assert "top 2 heads by bir_drop: mean over D of BIR_i - BIR_i^(-h)" in shown
    assert "big_drop (rank)" in shown and "big_minus_fig (rank)" in shown
    ranking = pq.read_table(os.path.join(scored_run, "rankings.parquet"))
    assert ranking["rank"].to_pylist() == ranking["bir_drop_rank"].to_pylist()
    again = cigma("show", scored_run, "--score", "big_drop").stdout
    assert "top 2 heads by big_drop" in again
    bad = cigma("show", scored_run, "--score", "fig", check=False)
    assert bad.returncode == 2 and "can rank by big_drop, bir_drop, big_minus_fig" in bad.stderr


def test_auto_k_chooses_within_the_guard_on_held_out_images(scored_run):
    proc = cigma("prune", scored_run, "--auto-k", "--max-clean-drop", "0.0", "--mask-images", "4",
                 "--random-seeds", "2", "--quiet")
    out = proc.stdout
    assert "held-out images:" in out and "guard: clean accuracy may drop by at most 0" in out
    assert "random (mean of 2)" in out and ("chosen: the top" in out or "chosen: none" in out)
    rows = pq.read_table(os.path.join(scored_run, "eval", "auto-k.parquet")).to_pylist()
    intact = next(r for r in rows if r["control"] == "intact")
    assert intact["accuracy"] == 1.0  # only images the intact model gets right
    assert {r["control"] for r in rows} >= {"intact", "big_drop", "bir_drop", "big_minus_fig", "random"}
    choice = json.loads(open(os.path.join(scored_run, "eval", "auto-k.json")).read())
    for r in rows:
        if r["verdict"] in ("chosen", "within guard"):
            assert r["accuracy"] == 1.0 and r["bir_mean"] < intact["bir_mean"]
    if choice["k"]:
        row = next(r for r in rows if r["verdict"] == "chosen")
        assert (row["control"], row["k"]) == (choice["score"], choice["k"])
    # held out: none of the images of D, only correctly classified ones
    d = set(pq.read_table(os.path.join(scored_run, "masks"))["image_id"].to_pylist())
    preds = pq.read_table(os.path.join(scored_run, "predictions")).to_pylist()
    heldout = [p for p in preds if p["correct"] and p["image_id"] not in d]
    assert intact["n_images"] == len(heldout) > 0

    bad = cigma("prune", scored_run, "--auto-k", "--k", "2", check=False)
    assert bad.returncode == 2 and "--k-grid" in bad.stderr


def test_measure_fig_off_keeps_the_paper_score_only(tmp_path, image_folder, tiny_checkpoint):
    path, model, kwargs = tiny_checkpoint
    cfg = tmp_path / "c.yaml"
    cfg.write_text("measure_fig: false\ntp_ratio: 0.4\nmask_steps: 2\nmask_batch: 4\nbootstrap: 50\ntop_k: 0.2\n")
    out = str(tmp_path / "run")
    shown = cigma("scan", "--model", f"timm:{model}", "--checkpoint", path, "--model-kwargs", *model_args(kwargs),
                  "--data", image_folder, "--out", out, "--config", str(cfg), "--quiet").stdout
    assert "top 2 heads by big_drop" in shown  # 0.2 of 9 heads = 1.8 -> 2
    assert "only big_drop is available" in shown
    deltas = pq.read_table(os.path.join(out, "deltas"))
    assert "fig_ablated" not in deltas.column_names
    assert "bir_drop" not in pq.read_table(os.path.join(out, "rankings.parquet")).column_names
    bad = cigma("sweep", out, "--k", "1", "--scores", "bir_drop", check=False)
    assert bad.returncode == 2 and "did not measure FIG" in bad.stderr


def test_export_by_another_score(scored_run, tmp_path):
    out = str(tmp_path / "pruned.pth")
    proc = cigma("export", scored_run, "--k", "2", "--score", "big_minus_fig", "--out", out)
    ranking = pq.read_table(os.path.join(scored_run, "rankings.parquet")).sort_by("big_minus_fig_rank").slice(0, 2)
    named = " ".join(f"{r['layer']}.{r['head']}" for r in ranking.to_pylist())
    assert f"(top 2 of rankings.parquet by big_minus_fig): {named}" in proc.stdout
    info = json.loads(open(out + ".json").read())
    assert [(r["layer"], r["head"]) for r in info["removed_heads"]] == [
        (r["layer"], r["head"]) for r in ranking.to_pylist()]
