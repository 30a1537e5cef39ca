"""Issue 13's commands as a user runs them: `scan --adaptive [--order screen]`, then `show`, `status`, `report`,
`prune`, `sweep` on the adaptive run; `screen RUN` with its fidelity; `bench adaptive RUN`."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from cigma_ray.cli import main
from cigma_ray.config import Config

from helpers import cli, finished_run, model_args

CFG = Config(tp_ratio=0.8, mask_steps=3, mask_batch=4, unit_images=4, bootstrap=50, top_k=2, batch_size=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder, tiny_checkpoint):
    """An exhaustive run of the tiny checkpoint, and `scan --adaptive --order screen` on its predictions and masks."""
    root = tmp_path_factory.mktemp("adaptive")
    exhaustive = finished_run(root / "exhaustive", image_folder, tiny_checkpoint, CFG).job.out
    adaptive = str(root / "adaptive")
    os.makedirs(adaptive)
    for folder in ("predictions", "masks"):
        shutil.copytree(os.path.join(exhaustive, folder), os.path.join(adaptive, folder))
    import yaml

    (root / "c.yaml").write_text(yaml.safe_dump({**CFG.to_dict(), "adaptive_first": 3, "adaptive_growth": 1.5}))
    path, name, kwargs = tiny_checkpoint
    proc = cli("scan", "--model", f"timm:{name}", "--checkpoint", path, "--model-kwargs", *model_args(kwargs),
               "--data", image_folder, "--out", adaptive, "--config", str(root / "c.yaml"), "--adaptive",
               "--delta", "0.5", "--order", "screen")
    assert "top 2 heads by big_drop" in proc.stdout and "adaptive scan, delta 0.5" in proc.stdout
    assert "screen" in proc.stderr and "adaptive r0" in proc.stderr  # the pre-screen, then the rounds, as stages
    meta = json.loads((root / "adaptive" / "run.json").read_text())
    assert meta["config"]["adaptive"] and meta["config"]["delta"] == 0.5 and meta["config"]["adaptive_order"] == "screen"
    return exhaustive, adaptive


def test_show_and_status_say_what_an_adaptive_run_is(runs, capsys):
    exhaustive, adaptive = runs
    assert main(["show", adaptive, "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "interval (joint, 50%)" in out and "decided" in out and "in top K" in out
    assert "the tail's order is approximate" in out and "(head, image) pairs" in out
    top = lambda url: {(r["layer"], r["head"]) for r in pq.read_table(f"{url}/rankings.parquet").slice(0, 2).to_pylist()}
    assert top(adaptive) == top(exhaustive)
    assert main(["show", adaptive, "--score", "bir_drop"]) == 2
    assert "decided the top K by that score only" in capsys.readouterr().err
    assert main(["status", adaptive]) == 0
    out = capsys.readouterr().out
    assert "screen   " in out and "adaptive rounds 0-" in out and "pairs measured" in out and "ranked   yes" in out


def test_report_prune_and_sweep_work_on_an_adaptive_run(runs, capsys):
    _, adaptive = runs
    assert main(["report", adaptive, "--images", "1"]) == 0
    page = open(os.path.join(adaptive, "report", "index.html")).read()
    assert "the tail&#x27;s order is approximate" in page and "This run is an adaptive scan" in page
    assert main(["prune", adaptive, "--k", "2", "--random-seeds", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "by big_drop (top 2)" in out and "adaptive scan: its top 2 set is decided" in out
    assert main(["sweep", adaptive, "--k", "0,1,3", "--random-seeds", "1", "--quiet"]) == 0
    rows = pq.read_table(os.path.join(adaptive, "eval", "sweep.parquet")).to_pylist()
    assert {r["control"] for r in rows} == {"intact", "big_drop", "random", "lowest"}


def test_screen_reports_fidelity_where_an_exact_scan_exists(runs, capsys):
    exhaustive, adaptive = runs
    assert main(["screen", exhaustive, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "gradient pre-screen" in out and "fidelity to the exact scan" in out and "recall@2" in out
    result = json.loads(open(os.path.join(exhaustive, "screen.json")).read())
    assert set(result["fidelity"]) == {"big_drop", "bir_drop", "big_minus_fig"}
    for f in result["fidelity"].values():
        assert -1 <= f["spearman"] <= 1 and 0 <= f["recall_k"] <= f["recall_2k"] <= f["recall_4k"] <= 1
    table = pq.read_table(os.path.join(exhaustive, "screen.parquet"))
    assert table.num_rows == 9 and sorted(table["big_drop_rank"].to_pylist()) == list(range(1, 10))
    assert main(["screen", adaptive, "--quiet"]) == 0  # its screen/ exists (--order screen): read, not recomputed
    assert "no fidelity: the run's scan is adaptive" in capsys.readouterr().out


def test_bench_adaptive_replays_an_exhaustive_run(runs, capsys, tmp_path):
    exhaustive, adaptive = runs
    assert main(["bench", "adaptive", exhaustive, "--scales", "1,2", "--top-k", "3", "--json",
                 str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "as scanned" in out and "2x resample" in out and "top-K set equal to the exhaustive one in 3/3" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["k"] == 3 and result["views"] == 3 and all(r["matched"] for r in result["rows"])
    assert all(r["forwards"] <= r["exhaustive_forwards"] for r in result["rows"])
    assert main(["bench", "adaptive", exhaustive, "--order", "screen"]) == 0  # screen.parquet from the test above
    assert "with the pre-screen's cost" in capsys.readouterr().out
    for args, message in ((["bench", "adaptive", adaptive], "is an adaptive run"),
                          (["bench", "adaptive"], "needs a RUN"),
                          (["bench", "--delta", "0.1"], "options of `bench adaptive RUN`"),
                          (["bench", "adaptive", exhaustive, "--images", "3"], "--images"),
                          (["bench", "adaptive", exhaustive, "--delta", "2"], "--delta 2")):
        assert main(args) == 2, args
        assert message in capsys.readouterr().err


def test_adaptive_options_need_adaptive(tmp_path, image_folder, capsys):
    args = ["scan", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--data", image_folder,
            "--out", str(tmp_path / "x"), "--dry-run"]
    assert main([*args, "--delta", "0.1"]) == 2
    assert "add --adaptive" in capsys.readouterr().err
    assert main([*args, "--adaptive", "--delta", "0"]) == 2
    assert "delta" in capsys.readouterr().err
    assert main([*args, "--adaptive", "--order", "screen"]) == 0
