"""`cigma-ray bench` in process, on a 32 px random ViT: what it writes, never how fast it was."""
from __future__ import annotations

import json

import pytest
import torch

from cigma_ray.cli import main

TINY = ["--model", "timm:vit_tiny_patch16_224", "--img-size", "32", "--device", "cpu", "--batch-sizes", "1,4",
        "--images", "2", "--mask-steps", "2", "--repeats", "2"]


def test_bench_writes_json_and_plot(tmp_path, capsys):
    assert main(["bench", *TINY, "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("forward", "paper-style loop", "engine scan", "masks", "engine / paper loop", "max |engine - loop|",
                 "bf16 vs fp32 top-16"):
        assert line in out
    assert "PASS" in out or "MISS" in out  # cpu fp32 has the engine / loop target

    (json_path,) = tmp_path.glob("bench-vit_tiny_patch16_224-cpu-*-fp32-*.json")
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(json_path.read_text())
    assert {"date", "device", "device_name", "precision", "machine", "settings", "models"} <= result.keys()
    assert {"torch", "timm", "ray", "numpy", "python"} <= result["machine"].keys()
    (m,) = result["models"]
    assert {"forward", "engine", "paper_loop", "masks", "ratios", "targets", "max_abs_engine_minus_loop_fp32",
            "bf16_top_k"} <= m.keys()
    assert [p["batch_size"] for p in m["forward"]["points"]] == [1, 4]
    assert [p["batch_size"] for p in m["engine"]["points"]] == [1, 4]
    assert m["max_abs_engine_minus_loop_fp32"] <= 1e-5
    assert all(ratio > 0 for ratio in m["ratios"].values())
    assert set(m["targets"]) == {"engine_over_paper_loop"}
    top = m["bf16_top_k"]
    assert top["k"] == 16 and len(top["seeds"]) == 3
    assert all(0 <= s["overlap"] <= 1 for s in top["seeds"])


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "8,zero"], "--batch-sizes"),
    (["--batch-sizes", "0,8"], "--batch-sizes"),
    (["--model", "no_such_model"], "timm has no model"),
    (["--images", "0"], "--images"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bench_bad_input_exits_2(tmp_path, capsys, args, message):
    assert main(["bench", "--device", "cpu", *args, "--results", str(tmp_path)]) == 2  # a later --device wins
    err = capsys.readouterr().err
    assert err.startswith("cigma-ray bench: error:") and message in err
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(600)
def test_the_shortcut_benchmark_script_writes_its_tables(tmp_path):
    """benchmarks/bench_shortcut.py (the README's score x ablation x K tables) end to end on the reduced scenes
    benchmark with tiny settings: both ablations, every score, random heads, --auto-k's choices, the machine."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_shortcut.py"
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(script), "--benchmark", "scenes", "--reduced", "--work",
                           str(tmp_path / "work"), "--results", str(results), "--ks", "1", "--seeds", "2",
                           "--mask-images", "8", "--heldout-images", "8", "--mask-steps", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = results.glob("shortcut-scenes-reduced-*.json")
    result = json.loads(found.read_text())
    assert set(result["ablations"]) == {"zero", "mean"} and result["machine"]["cpu"]
    rows = result["ablations"]["zero"]["rows"]
    assert {r["set"] for r in rows} == {"aligned", "conflicting"}
    assert {"intact", "big_drop", "bir_drop", "big_minus_fig", "swap_drop", "random"} <= {r["control"] for r in rows}
    choices = result["ablations"]["mean"]["auto_k"]["choices"]
    assert {(c["objective"], c["max_clean_drop"]) for c in choices} == {(o, g) for o in ("conflict", "bir")
                                                                        for g in (0.02, 0.05, 0.1)}
    table = found.with_suffix(".md").read_text()
    assert "#### zero ablation" in table and "#### mean ablation" in table and "--auto-k objective" in table
