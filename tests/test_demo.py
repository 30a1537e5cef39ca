"""`cigma-ray demo`, the built-in default, end to end as a new user runs it."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cigma_ray.data.demo import CLASSES, SPLITS, ensure_demo_data, make_image


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
    assert {r["control"] for r in rows} == {"intact", "big_drop", "bir_drop", "big_minus_fig", "random", "lowest"}
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


def test_demo_data_is_deterministic_and_in_imagefolder_layout(tmp_path):
    a = ensure_demo_data(tmp_path / "a", splits=("aligned",))
    b = ensure_demo_data(tmp_path / "b", splits=("aligned",))
    files = sorted(p.relative_to(a["aligned"]) for p in a["aligned"].rglob("*.png"))
    assert len(files) == SPLITS["aligned"].size
    assert sorted(os.listdir(a["aligned"])) == sorted(CLASSES)
    for rel in files[:20]:
        assert (a["aligned"] / rel).read_bytes() == (b["aligned"] / rel).read_bytes()
    import numpy as np

    img = make_image(np.random.default_rng(0), 0, 1)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
