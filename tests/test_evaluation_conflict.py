"""Counterfactual conflict accuracy (accuracy on each masked image's foreground over backgrounds of other
classes, against its own label) equals its definition; --auto-k's conflict objective: the guard, random heads,
the paired interval, and what it says when the held-out images are too few."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.config import Config
from cigma_ray.engine.reference import substituted_head
from cigma_ray.evaluation import choose_pruning, evaluate, scan_eval_set
from cigma_ray.evaluation.evalsets import SWAP_DONORS
from cigma_ray.method import choose_donors, swapped
from cigma_ray.models import ModelSpec
from cigma_ray.models.surgery import zeroed_head
from cigma_ray.pipeline import Job, Pipeline
from cigma_ray.rundir import open_run

from helpers import cli, labelled_folder

CFG = Config(tp_ratio=0.5, mask_steps=4, mask_batch=4, unit_images=4, bootstrap=200, top_k=2, batch_size=8,
             measure_swap=True)




@pytest.fixture(scope="module", params=["zero", "mean"])
def run(request, tmp_path_factory, tiny_checkpoint):
    path, name, kwargs = tiny_checkpoint
    spec = ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)
    root = tmp_path_factory.mktemp(f"conflict-{request.param}")
    data = labelled_folder(root / "images", spec, seed=5)
    job = Job(model=spec, data=data, out=str(root / "run"), config=CFG.replace(ablation=request.param))
    Pipeline(job, progress=False).run_all()
    return job.out


def test_conflict_accuracy_equals_its_definition(run):
    scanned = open_run(run).reopen()
    data = scan_eval_set(scanned)
    assert data.swappable and data.donors.shape == (len(data.fg), SWAP_DONORS)
    np.testing.assert_array_equal(data.donors, choose_donors(data.mask_labels, CFG.seed, SWAP_DONORS))
    assert all(data.mask_labels[d] != data.mask_labels[i] for i, row in enumerate(data.donors) for d in row)
    model = scanned.loaded.adapter.model
    removed = [(0, 1), (2, 0)]
    ablation = scanned.run.ablation
    means = scanned.loaded.adapter.gates.means
    with contextlib.ExitStack() as stack, torch.no_grad():
        for layer, head in removed:
            if ablation == "mean":
                attn = model.blocks[layer].attn
                stack.enter_context(substituted_head(attn.proj, head, attn.num_heads, means[layer]))
            else:
                stack.enter_context(zeroed_head(model.blocks[layer].attn, head))
        correct = []
        for j in range(SWAP_DONORS):
            x = swapped(data.mask_images, data.fg, data.mask_images[data.donors[:, j]])
            correct.append(model(x).argmax(1).numpy() == data.mask_labels)
    want = np.stack(correct, axis=1).mean(axis=1).mean()
    row = evaluate(scanned.replica, data, removed, scanned.cfg, intervals=True)
    assert row["conflict_accuracy"] == pytest.approx(want, abs=1e-12)
    assert row["conflict_accuracy_low"] <= row["conflict_accuracy"] <= row["conflict_accuracy_high"]
    intact = evaluate(scanned.replica, data, [], scanned.cfg)
    assert 0 <= intact["conflict_accuracy"] <= 1


def rows_for_choice():
    """intact conflict accuracy 0.40; candidates that break the guard, lose to random heads, or gain."""
    def row(control, k, acc, conflict, seed=None, collapsed=False):
        return {"control": control, "k": k, "seed": seed, "heads": "", "accuracy": acc, "conflict_accuracy": conflict,
                "bir_mean": 0.2, "collapsed": collapsed}
    return [row("intact", 0, 1.0, 0.40),
            row("big_drop", 1, 0.90, 0.70), row("bir_drop", 1, 0.99, 0.50), row("swap_drop", 1, 0.995, 0.45),
            row("big_minus_fig", 1, 0.99, 0.35),
            row("random", 1, 1.0, 0.40, seed=0), row("random", 1, 0.99, 0.47, seed=1)]


def test_choose_pruning_for_conflict_accuracy():
    chosen, judged = choose_pruning(rows_for_choice(), 0.02, "conflict")
    verdicts = {j["control"]: j["verdict"] for j in judged}
    assert (chosen["control"], chosen["k"]) == ("bir_drop", 1)
    assert verdicts["big_drop"].startswith("clean accuracy drop 0.100 > 0.02")
    assert verdicts["swap_drop"].startswith("no better than 1 random heads (best draw 0.470)")
    assert verdicts["big_minus_fig"] == "does not raise counterfactual conflict accuracy"
    assert chosen["gain"] == pytest.approx(0.10)
    assert choose_pruning(rows_for_choice(), 0.2, "conflict")[0]["control"] == "big_drop"  # a looser guard
    # paired intervals: one image of 20 flips to right under bir_drop: a gain of 0.05 that resampling cannot
    # tell from none (its interval reaches 0), so nothing is chosen; with 6 flips it is chosen
    intact = np.r_[np.ones(8), np.zeros(12)]
    for flips, verdict in ((1, "gain within noise"), (6, "chosen")):
        pruned = intact.copy()
        pruned[8: 8 + flips] = 1
        rows = rows_for_choice()
        rows[2]["conflict_accuracy"] = float(pruned.mean())
        rows[6]["conflict_accuracy"] = 0.42  # the best random draw
        per_image = [{"conflict": intact}] + [{"conflict": pruned if r["control"] == "bir_drop" else intact}
                                              for r in rows[1:]]
        chosen, judged = choose_pruning(rows, 0.02, "conflict", per_image, resamples=500, seed=0)
        bir_row = next(j for j in judged if j["control"] == "bir_drop")
        assert bir_row["verdict"].startswith(verdict), bir_row["verdict"]
        assert bir_row["gain"] == pytest.approx(flips / 20) and bir_row["gain_low"] <= bir_row["gain"] <= bir_row["gain_high"]
        assert (chosen is None) == (flips == 1)


def test_auto_k_for_conflict_accuracy_through_the_cli(run):
    proc = cli("prune", run, "--auto-k", "--objective", "conflict", "--mask-images", "8", "--random-seeds", "2",
               "--max-clean-drop", "0.5", "--quiet")
    out = proc.stdout
    assert "objective: counterfactual conflict accuracy (--objective conflict)" in out
    assert "conflict acc. (swap)" in out and "conflict gain" in out and "resolution: with 8 masked" in out
    assert "chosen: " in out
    choice = json.loads(open(os.path.join(run, "eval", "auto-k.json")).read())
    assert choice["objective"] == "conflict" and choice["n_mask_images"] == 8 and choice["n_swaps"] == 8 * SWAP_DONORS
    rows = pq.read_table(os.path.join(run, "eval", "auto-k.parquet")).to_pylist()
    intact = next(r for r in rows if r["control"] == "intact")
    for r in rows:
        if r["verdict"] in ("chosen", "within guard"):
            assert r["conflict_accuracy"] > intact["conflict_accuracy"] and r["gain_low"] > 0
            best_random = max(d["conflict_accuracy"] for d in rows if d["control"] == "random" and d["k"] == r["k"])
            assert r["conflict_accuracy"] > best_random
    if choice["k"]:
        assert "It buys counterfactual conflict accuracy" in choice["reason"] and "It costs" in choice["reason"]
    bad = cli("prune", run, "--objective", "bir", check=False)
    assert bad.returncode == 2 and "go with --auto-k" in bad.stderr


def test_show_sweep_and_report_carry_swap_drop_and_the_trade_off(run):
    if open_run(run).ablation != "mean":
        pytest.skip("once is enough: the mean-ablation run")
    shown = cli("show", run).stdout
    assert "swap_drop (rank)" in shown and "mean SWAP" in shown and "ablation  mean" in shown
    assert "top 2 heads by swap_drop" in cli("show", run, "--score", "swap_drop").stdout
    swept = cli("sweep", run, "--k", "0,1,2", "--random-seeds", "2", "--quiet").stdout
    assert "top 2 by swap_drop" in swept and "conflict acc. (swap)" in swept
    rows = pq.read_table(os.path.join(run, "eval", "sweep.parquet")).to_pylist()
    for r in rows:
        assert r["conflict_accuracy_low"] <= r["conflict_accuracy"] <= r["conflict_accuracy_high"]
        assert r["n_swaps"] == r["n_mask_images"] * SWAP_DONORS
    cli("report", run, "--images", "1")
    html = open(os.path.join(run, "report", "index.html"), encoding="utf-8").read()
    assert "The trade-off: clean accuracy against counterfactual conflict accuracy" in html
    assert "conflict accuracy (swap)" in html and "ablation mean" in html and "measure_swap True" in html
