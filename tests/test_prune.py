"""`prune` and `sweep`: pruned evaluation equals weight zeroing, the metrics and their intervals, the commands."""
from __future__ import annotations

import contextlib
import math
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.cli import main
from cigma_ray.config import Config
from cigma_ray.engine.reference import zeroed_head
from cigma_ray.method import accuracy, bir_summary, bootstrap, counterfactuals, ece, js, nll, probs
from cigma_ray.models.timm_generic import find_attentions

from cigma_ray.prune import (bir_statistics, evaluate, prediction_statistics, random_heads, scan_eval_set,
                             top_heads)
from cigma_ray.storage import RunDir

from helpers import finished_run, write_folder

FAST = Config(tp_ratio=0.8, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=200, top_k=3, batch_size=8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_folder, tiny_checkpoint):
    return finished_run(tmp_path_factory.mktemp("prune") / "run", image_folder, tiny_checkpoint, FAST)


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("other") / "other", per_class=6, seed=7)


def test_pruned_evaluation_equals_weight_zeroing(tiny_run):
    """Logits and every metric of the keep-mask ablation equal the same heads' zeroed weights, whole model, fp32."""
    p = tiny_run
    data = scan_eval_set(p)
    rankings = p.run.read_table("rankings.parquet")
    model, attentions = p.adapter.model, find_attentions(p.adapter.model)
    for removed in (top_heads(rankings, 3), random_heads(p.adapter.heads, 4, seed=1)):
        got = evaluate(p.worker.replica, data, removed, p.cfg, intervals=True)
        keep_logits = p.worker.replica.logits(data.images, p.worker.replica.keep_without(removed))
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
    preds = p.run.read_folder("predictions")
    masks = p.run.read_folder("masks")
    assert len(data.labels) == preds.num_rows and len(data.skipped) == 1  # the broken image is left out
    assert data.in_sample and len(data.fg) == masks.num_rows
    row = evaluate(p.worker.replica, data, [], p.cfg)
    assert row["accuracy"] == pytest.approx(np.mean(preds["correct"].to_numpy(zero_copy_only=False)))
    assert row["bir_mean"] == pytest.approx(bir_summary(masks["fig"].to_numpy(), masks["big"].to_numpy())["bir_mean"],
                                            abs=1e-6)


def test_metric_statistics_on_hand_made_cases():
    # perfectly calibrated: confidence 0.75 with 3 of 4 right, 0.9 with 9 of 10, 1.0 with 2 of 2
    p = np.array([[0.75, 0.25]] * 4 + [[0.1, 0.9]] * 10 + [[1.0, 0.0]] * 2)
    labels = np.array([0, 0, 0, 1] + [1] * 9 + [0] + [0, 0])
    stats = prediction_statistics(p, labels)
    ones = np.ones((1, len(p)))
    assert stats["ece"](ones)[0] == pytest.approx(0.0, abs=1e-12)
    assert stats["accuracy"](ones)[0] == pytest.approx(14 / 16)
    expected_nll = -(3 * math.log(0.75) + math.log(0.25) + 9 * math.log(0.9) + math.log(0.1) + 2 * math.log(1.0)) / 16
    assert stats["nll"](ones)[0] == pytest.approx(expected_nll, rel=1e-12)
    # a probability of 0 for the label is clamped at 1e-12, as `nll` does
    assert prediction_statistics(np.array([[1.0, 0.0]]), np.array([1]))["nll"](np.ones((1, 1)))[0] == pytest.approx(
        -math.log(1e-12))

    # a row of counts is the metric on the images repeated that often
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(4) * 0.5, size=30)
    y = rng.integers(0, 4, size=30)
    counts = rng.integers(0, 4, size=(3, 30)).astype(float)
    stats = prediction_statistics(q, y)
    for row in counts:
        idx = np.repeat(np.arange(30), row.astype(int))
        for name, plain in (("accuracy", accuracy), ("nll", nll), ("ece", ece)):
            assert stats[name](row[None])[0] == pytest.approx(plain(q[idx], y[idx]), abs=1e-12)

    fig, big = rng.uniform(0, 0.5, 20), rng.uniform(0, 0.5, 20)
    fig[3] = big[3] = 0.0  # depends on neither: left out, as bir_summary does
    expected = bir_summary(fig, big)
    got = {name: f(np.ones((1, 20)))[0] for name, f in bir_statistics(fig, big).items()}
    assert got["bir_mean"] == pytest.approx(expected["bir_mean"]) and got["bir_ratio"] == pytest.approx(expected["bir_ratio"])
    assert all(math.isnan(f(np.ones((1, 2)))[0]) for f in bir_statistics(np.zeros(2), np.zeros(2)).values())


def test_bootstrap_intervals_contain_the_point_and_are_seeded():
    rng = np.random.default_rng(1)
    q = rng.dirichlet(np.ones(3), size=50)
    y = rng.integers(0, 3, size=50)
    stats = {**prediction_statistics(q, y), **bir_statistics(rng.uniform(0, 1, 50), rng.uniform(0, 1, 50))}
    a = bootstrap(stats, 50, 500, 0.95, seed=3)
    assert a == bootstrap(stats, 50, 500, 0.95, seed=3) and a != bootstrap(stats, 50, 500, 0.95, seed=4)
    for name in ("accuracy", "nll", "bir_mean", "bir_ratio"):  # means and ratios of means: the point lies inside
        point, low, high = a[name]
        assert low <= point <= high, name
    assert a["ece"][1] <= a["ece"][2]  # ECE is biased upwards under resampling: its point may lie below
    assert a["accuracy"][0] == accuracy(q, y)
    point, low, high = bootstrap(stats, 50, 0, 0.95, seed=3)["nll"]
    assert point == pytest.approx(nll(q, y)) and math.isnan(low) and math.isnan(high)


def test_prune_and_sweep_through_the_cli(tiny_run, other_folder, capsys):
    out = tiny_run.job.out
    assert main(["prune", out, "--k", "2", "--random-seeds", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    for line in ("top 2 by big_drop", "top 2 by bir_drop", "top 2 by big_minus_fig", "2 random (mean of 3)",
                 "2 lowest-scored", "in-sample", "bootstrap interval"):
        assert line in text
    rows = pq.read_table(os.path.join(out, "eval", "prune-k2.parquet")).to_pylist()
    assert [r["control"] for r in rows] == ["intact", "big_drop", "bir_drop", "big_minus_fig", "random", "random",
                                            "random", "lowest"]
    assert [r["seed"] for r in rows if r["control"] == "random"] == [0, 1, 2]
    ranking = tiny_run.run.read_table("rankings.parquet")
    for i, score in enumerate(("big_drop", "bir_drop", "big_minus_fig"), start=1):
        top = ranking.sort_by(f"{score}_rank").slice(0, 2).to_pylist()
        assert rows[i]["heads"] == " ".join(f"{r['layer']}.{r['head']}" for r in top)
    for r in rows:
        for m in ("accuracy", "nll", "bir_mean", "bir_ratio"):
            assert r[f"{m}_low"] <= r[m] <= r[f"{m}_high"]

    argv = ["sweep", out, "--k", "0,1,9", "--eval-data", other_folder, "--eval-data", tiny_run.job.data,
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


def without_nan(rows: list[dict]) -> list[dict]:
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]


def test_clear_errors(tiny_run, tmp_path, capsys):
    out = tiny_run.job.out
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
