"""`cigma-ray demo`, the built-in default, end to end as a new user runs it."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest


@pytest.mark.timeout(900)
def test_demo_runs_the_whole_method_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cigma_ray.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("predict", "mask", "scan"):
        assert stage in proc.stderr  # a progress bar per stage
    assert "top 3 heads by big_drop" in proc.stdout and "trade-off: removing the top K heads" in proc.stdout
    assert "choosing a score and K automatically" in proc.stdout and "chosen: " in proc.stdout
    rows = pq.read_table(out / "eval" / "sweep.parquet").to_pylist()
    assert {r["set"] for r in rows} == {"aligned", "conflicting"}
    assert {r["control"] for r in rows} == {"intact", "big_drop", "bir_drop", "big_minus_fig", "random",
                                            "lowest"}
    assert all(0 <= r["conflict_accuracy"] <= 1 for r in rows)
    intact = {r["set"]: r for r in rows if r["control"] == "intact"}
    # the planted shortcut is there: the intact model is much better when the background agrees
    assert intact["aligned"]["accuracy"] > intact["conflicting"]["accuracy"] + 0.2
    assert (out / "eval" / "sweep.png").stat().st_size > 10_000
    auto = pq.read_table(out / "eval" / "auto-k.parquet").to_pylist()
    base = next(r for r in auto if r["control"] == "intact")
    for r in auto:  # the guard held: anything chosen or allowed lost at most 0.02 clean accuracy
        if r["verdict"] in ("chosen", "within guard"):
            assert base["accuracy"] - r["accuracy"] <= 0.02 + 1e-12
    ranking = pq.read_table(out / "rankings.parquet")
    assert ranking.num_rows == 24 and sorted(ranking["rank"].to_pylist()) == list(range(1, 25))

    again = subprocess.run([sys.executable, "-m", "cigma_ray.cli", "demo", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert "mask" not in again.stderr  # everything was already done: resumed, nothing recomputed


@pytest.mark.timeout(900)
def test_the_scenes_benchmark_runs_from_one_command(tmp_path):
    """`cigma-ray demo --benchmark scenes --reduced`: the second benchmark's data generated, its shipped model
    scanned, every score swept on its aligned and conflicting splits, --auto-k's choice; --reduced is refused
    for the shapes benchmark, which has one size."""
    out = tmp_path / "scenes"
    proc = subprocess.run([sys.executable, "-m", "cigma_ray.cli", "demo", "--benchmark", "scenes", "--reduced",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "scenes_data").iterdir() if p.is_dir()) == ["aligned", "conflicting", "scan"]
    assert len(list((out / "scenes_data" / "conflicting").rglob("*.png"))) == 64
    rows = pq.read_table(out / "eval" / "sweep.parquet").to_pylist()
    intact = {r["set"]: r for r in rows if r["control"] == "intact"}
    assert intact["aligned"]["accuracy"] > intact["conflicting"]["accuracy"] + 0.2  # the planted shortcut
    assert {r["control"] for r in rows} >= {"big_drop", "bir_drop", "big_minus_fig", "random"}
    assert pq.read_table(out / "rankings.parquet").num_rows == 24 and "chosen: " in proc.stdout

    bad = subprocess.run([sys.executable, "-m", "cigma_ray.cli", "demo", "--reduced", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--reduced is for --benchmark scenes" in bad.stderr
    assert not (tmp_path / "x").exists()
