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
    assert {r["control"] for r in rows} == {"intact", "big_drop", "bir_drop", "big_minus_fig", "swap_drop", "random",
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
