"""Evaluation (evaluation/): pruned metrics equal weight zeroing, eval sets, prune and sweep against controls, and --auto-k under its clean-accuracy guard."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.cli import main
from cigma_ray.config import Config
from cigma_ray.evaluation import (
    choose_pruning,
    default_k_grid,
    evaluate,
    random_heads,
    scan_eval_set,
)
from cigma_ray.method import (
    accuracy,
    bir_summary,
    counterfactuals,
    ece,
    js,
    nll,
    probs,
)
from cigma_ray.models.attention import find_attentions
from cigma_ray.models.surgery import zeroed_head
from cigma_ray.rundir import RunDir, open_run, top_heads

from helpers import cli, write_folder

FAST = Config(tp_ratio=0.8, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=200, top_k=3, batch_size=8)


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


def without_nan(rows: list[dict]) -> list[dict]:
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("other") / "other", per_class=6, seed=7)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fast_run_dir):
    """The finished tiny run (a copy of conftest's fast_run_dir, made with FAST), reopened as evaluation sees it (model,
    data and replica rebuilt from run.json)."""
    out = tmp_path_factory.mktemp("prune") / "run"
    shutil.copytree(fast_run_dir, out)
    return open_run(str(out)).reopen()


def test_pruned_evaluation_equals_weight_zeroing(tiny_run):
    """Logits and every metric of the keep-mask ablation equal the same heads' zeroed weights, whole model, fp32."""
    p = tiny_run
    data = scan_eval_set(p)
    rankings = p.run.rankings()
    model, attentions = p.loaded.adapter.model, find_attentions(p.loaded.adapter.model)
    for removed in (top_heads(rankings, 3), random_heads(p.loaded.adapter.heads, 4, seed=1)):
        got = evaluate(p.replica, data, removed, p.cfg, intervals=True)
        keep_logits = p.replica.logits(data.images, p.replica.keep_without(removed))
        with contextlib.ExitStack() as stack:
            for layer, head in removed:
                stack.enter_context(zeroed_head(attentions[layer], head))
            with torch.no_grad():
                logits = model(data.images)
                no_bg, no_fg = counterfactuals(data.mask_images, data.fg)
                q, q_no_fg, q_no_bg = (probs(model(x)) for x in (data.mask_images, no_fg, no_bg))
        torch.testing.assert_close(keep_logits, logits, rtol=0, atol=1e-5)
        pr = torch.softmax(logits, dim=1).numpy()
        fig, big = js(q, q_no_fg).numpy(), js(q, q_no_bg).numpy()
        bir = bir_summary(fig, big)
        expected = {"accuracy": accuracy(pr, data.labels), "nll": nll(pr, data.labels), "ece": ece(pr, data.labels),
                    "bir_mean": bir["bir_mean"], "bir_ratio": bir["bir_ratio"], "fig": fig.mean(), "big": big.mean()}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), key
        assert got["k"] == len(removed)


def test_intact_evaluation_on_the_scan_data_matches_its_predictions(tiny_run):
    p = tiny_run
    data = scan_eval_set(p)
    preds = p.dir.read_folder("predictions")
    masks = p.dir.read_folder("masks")
    assert len(data.labels) == preds.num_rows and len(data.skipped) == 1  # the broken image is left out
    assert data.in_sample and len(data.fg) == masks.num_rows
    row = evaluate(p.replica, data, [], p.cfg)
    assert row["accuracy"] == pytest.approx(np.mean(preds["correct"].to_numpy(zero_copy_only=False)))
    assert row["bir_mean"] == pytest.approx(bir_summary(masks["fig"].to_numpy(), masks["big"].to_numpy())["bir_mean"],
                                            abs=1e-6)


def test_prune_and_sweep_through_the_cli(tiny_run, other_folder, capsys):
    out = tiny_run.run.url
    assert main(["prune", out, "--k", "2", "--random-seeds", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    for line in ("top 2 by big_drop", "top 2 by bir_drop", "top 2 by big_minus_fig", "top 2 by swap_drop",
                 "2 random (mean of 3)", "2 lowest-scored", "in-sample", "bootstrap interval", "conflict acc. (swap)"):
        assert line in text
    rows = pq.read_table(os.path.join(out, "eval", "prune-k2.parquet")).to_pylist()
    assert [r["control"] for r in rows] == ["intact", "big_drop", "bir_drop", "big_minus_fig", "swap_drop", "random",
                                            "random", "random", "lowest"]
    assert [r["seed"] for r in rows if r["control"] == "random"] == [0, 1, 2]
    ranking = tiny_run.run.rankings()
    for i, score in enumerate(("big_drop", "bir_drop", "big_minus_fig", "swap_drop"), start=1):
        top = ranking.sort_by(f"{score}_rank").slice(0, 2).to_pylist()
        assert rows[i]["heads"] == " ".join(f"{r['layer']}.{r['head']}" for r in top)
    for r in rows:
        for m in ("accuracy", "nll", "bir_mean", "bir_ratio"):
            assert r[f"{m}_low"] <= r[m] <= r[f"{m}_high"]

    argv = ["sweep", out, "--k", "0,1,9", "--eval-data", other_folder, "--eval-data", tiny_run.run.meta['data']['url'],
            "--mask-images", "5", "--random-seeds", "2", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "learning masks of 5 images of other" in captured.err
    assert "top 9 by big_drop" in captured.out and "9 lowest-scored" in captured.out
    assert "collapsed: top 9 by big_drop" in captured.out  # no head left: the class token never sees the image
    rows = pq.read_table(os.path.join(out, "eval", "sweep.parquet")).to_pylist()
    assert {r["set"] for r in rows} == {"other", "folder"}
    assert sorted({r["k"] for r in rows}) == [0, 1, 9]
    assert {r["bir_in_sample"] for r in rows if r["set"] == "folder"} == {True}
    assert {r["n_mask_images"] for r in rows if r["set"] == "other"} == {5}
    with open(os.path.join(out, "eval", "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert main(argv) == 0  # the eval set's masks are reused
    assert "learning masks" not in capsys.readouterr().err
    again = pq.read_table(os.path.join(out, "eval", "sweep.parquet")).to_pylist()
    assert without_nan(again) == without_nan(rows)


def test_clear_errors(tiny_run, tmp_path, capsys):
    out = tiny_run.run.url
    assert main(["prune", out, "--k", "10"]) == 2
    assert "--k=10: the model has 9 heads" in capsys.readouterr().err
    assert main(["sweep", out, "--k", "0,4,12"]) == 2
    assert "--k=12: the model has 9 heads" in capsys.readouterr().err
    assert main(["prune", out, "--k", "0"]) == 2  # 0 is the intact model: a sweep's baseline, not a pruning
    assert "--k=0: the model has 9 heads; choose K from 1 to 9" in capsys.readouterr().err
    assert main(["sweep", out, "--k", "four"]) == 2
    assert "write K values separated by commas" in capsys.readouterr().err

    unranked = tmp_path / "unranked"
    unranked.mkdir()
    shutil.copy(os.path.join(out, "run.json"), unranked / "run.json")
    assert main(["prune", str(unranked)]) == 2
    err = capsys.readouterr().err
    assert f"{unranked} has no rankings.parquet" in err and "cigma-ray scan" in err
    assert main(["sweep", str(tmp_path / "nothing"), "--k", "1"]) == 2
    assert "not a run directory" in capsys.readouterr().err

    four = write_folder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=1)
    assert main(["prune", out, "--eval-data", four]) == 2
    assert "named classes must be the same ones" in capsys.readouterr().err
    numbered = write_folder(tmp_path / "numbered", classes=("0", "5"), per_class=1)
    assert main(["prune", out, "--eval-data", numbered]) == 2
    assert "class 5 is not an output" in capsys.readouterr().err
    assert not RunDir(out).exists("eval/prune-k3.parquet")  # nothing evaluated before the checks


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


def test_auto_k_chooses_within_the_guard_on_held_out_images(scored_run):
    proc = cli("prune", scored_run, "--auto-k", "--objective", "bir", "--max-clean-drop", "0.0", "--mask-images", "4",
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

    bad = cli("prune", scored_run, "--auto-k", "--k", "2", check=False)
    assert bad.returncode == 2 and "--k-grid" in bad.stderr


def test_cached_eval_masks_belong_to_their_images(tmp_path, fast_run_dir, other_folder):
    """The eval-mask cache was keyed by the listing and the count only: once an image became unreadable, the cached
    masks were applied to other images. Now it is keyed by the sampled images' ids and checked when read."""
    from cigma_ray.data import open_source
    from cigma_ray.evaluation import eval_set

    out, data = tmp_path / "run", tmp_path / "eval"
    shutil.copytree(fast_run_dir, out)
    shutil.copytree(other_folder, data)
    scanned = open_run(str(out)).reopen()
    first = eval_set(scanned, open_source(str(data)), 4, "ev")
    old_cache, = os.listdir(out / "eval")
    victim = open_source(str(data)).records[0].path  # the first image: its removal shifts the sample
    with open(victim, "wb") as f:
        f.write(b"unreadable now")
    again = eval_set(scanned, open_source(str(data)), 4, "ev")
    assert len(again.skipped) == 1 and not torch.equal(again.mask_images, first.mask_images)
    expected = scanned.replica.masks(again.mask_images, scanned.cfg).fg  # one group of mask_batch=4, as eval_set learns
    assert torch.equal(again.fg, expected)
    assert torch.equal(eval_set(scanned, open_source(str(data)), 4, "ev").fg, expected)  # now from its own cache
    new_cache, = set(os.listdir(out / "eval")) - {old_cache}
    # a cache file that holds other images (or is damaged) is not trusted: the masks are learned again
    shutil.copy(out / "eval" / old_cache, out / "eval" / new_cache)
    assert torch.equal(eval_set(scanned, open_source(str(data)), 4, "ev").fg, expected)
    (out / "eval" / new_cache).write_bytes(b"PAR1 truncated")
    assert torch.equal(eval_set(scanned, open_source(str(data)), 4, "ev").fg, expected)


def test_evaluations_print_a_line_per_configuration_unless_quiet(tiny_run, capsys):
    """prune and sweep printed nothing between their first and last lines for tens of minutes (with --quiet, or in
    a log, where a bar drawn in place keeps nothing): now a line per configuration, with what it measured and an ETA."""
    out = tiny_run.run.url
    assert main(["sweep", out, "--k", "0,1", "--random-seeds", "1", "--scores", "big_drop"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prune ")]
    assert len(lines) == 4  # the intact model, the top 1, 1 random head, the lowest
    assert lines[0].startswith("prune 1/4  the intact model on ") and "accuracy" in lines[0] and "ETA" in lines[0]
    assert lines[1].startswith("prune 2/4  the top 1 by big_drop on ") and "BIR" in lines[1]
    assert "ETA" not in lines[-1] and lines[-1].startswith("prune 4/4  the 1 lowest by")
    assert main(["sweep", out, "--k", "0,1", "--random-seeds", "1", "--scores", "big_drop", "--quiet"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("prune ")]
