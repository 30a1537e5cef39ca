"""The run directory (rundir/): whole-file writes with checksums, run.json refusing a rerun with other settings, and a
finished run opened for reading: K, rankings by any score, masks, and its model and data rebuilt only as scanned."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from cigma_ray.config import ConfigError
from cigma_ray.data import DataError
from cigma_ray.models import ModelError
from cigma_ray.pipeline import Pipeline
from cigma_ray.rundir import RunDir, RunMismatch, StorageError, decode_fg, open_run

from helpers import FAST, job, write_folder


def test_incompatible_rerun_is_refused(tmp_path, image_folder, tiny_checkpoint):
    first = Pipeline(job(tmp_path, image_folder, tiny_checkpoint), progress=False)
    assert not first.run.exists("run.json")  # validating (as --dry-run does) writes nothing
    first.run_all()
    with pytest.raises(RunMismatch, match="tp_ratio"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=FAST.replace(tp_ratio=0.5)), progress=False)
    with pytest.raises(RunMismatch, match="precision"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, precision="bf16"), progress=False)
    with pytest.raises(RunMismatch, match="unit_images"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=FAST.replace(unit_images=5)), progress=False)
    other = write_folder(tmp_path / "other", per_class=3, seed=5)
    with pytest.raises(RunMismatch, match="image listing"):
        Pipeline(job(tmp_path, other, tiny_checkpoint), progress=False)
    # what never changes results may change
    Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=FAST.replace(batch_size=2, top_k=5)), progress=False)


def test_storage_writes_whole_files_and_returns_their_checksum(tmp_path):
    import hashlib

    run = RunDir(str(tmp_path / "run"))
    digest = run.write_bytes("a/b.bin", b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest() and run.read_bytes("a/b.bin") == b"hello"
    assert os.listdir(tmp_path / "run" / "a") == ["b.bin"]  # no temporary left behind
    assert run.list("a", suffix=".bin") == ["b.bin"] and run.list("missing") == []


def test_a_finished_run_opens_with_its_rankings_k_and_masks(scored_run):
    run = open_run(scored_run)
    assert run.n_heads == 9 and run.heads == [(layer, h) for layer in range(3) for h in range(3)]
    assert run.score == "bir_drop" and run.scores == ["big_drop", "bir_drop", "big_minus_fig", "swap_drop"]
    assert run.resolve_k(None) == 2 and run.resolve_k(5) == 5
    with pytest.raises(ConfigError, match="--k=10: the model has 9 heads"):
        run.resolve_k(10)
    with pytest.raises(ConfigError, match="--k=0"):
        run.resolve_k(0)
    assert run.resolve_k(0, allow_zero=True) == 0
    rankings = run.rankings()
    by = {s: rankings.sort_by(f"{s}_rank").to_pylist() for s in run.scores}
    assert run.top_heads(3) == [(r["layer"], r["head"]) for r in by["bir_drop"][:3]]  # the run's own score
    assert run.top_heads(3, "big_drop") == [(r["layer"], r["head"]) for r in by["big_drop"][:3]]
    assert run.top_heads(2, lowest=True) == [(r["layer"], r["head"]) for r in by["bir_drop"][::-1][:2]]
    masks = run.masks(["image_id", "fg"])
    assert masks["image_id"].to_pylist() == sorted(masks["image_id"].to_pylist())
    fg = decode_fg(masks["fg"], 32)
    assert fg.shape == (masks.num_rows, 32, 32) and fg.dtype == torch.bool
    assert (fg.sum(dim=(1, 2)) == 358).all()  # 35% of 1024 cells, exactly
    with pytest.raises(ConfigError, match="can rank by big_drop, bir_drop, big_minus_fig"):
        run.parse_scores("fig")


def test_reopen_refuses_other_weights_or_another_listing(scored_run, tmp_path, tiny_checkpoint):
    scanned = open_run(scored_run).reopen()
    assert scanned.heads == open_run(scored_run).heads and scanned.replica.batch_size == 8
    moved = tmp_path / "copy"
    shutil.copytree(scored_run, moved)
    meta = json.loads((moved / "run.json").read_text())
    changed = tmp_path / "changed.pth"
    state = torch.load(tiny_checkpoint[0], weights_only=True)
    state["head.bias"] = state["head.bias"] + 1
    torch.save(state, changed)
    with pytest.raises(ModelError, match="not the ones .* scanned.*Pass the original file with --checkpoint"):
        open_run(str(moved)).reopen(checkpoint=str(changed))
    meta["data"]["url"] = write_folder(tmp_path / "other", per_class=2, seed=3)
    (moved / "run.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="lists other images than when .* scanned it"):
        open_run(str(moved)).reopen()


def test_a_folder_without_run_json_is_no_run(tmp_path):
    with pytest.raises(StorageError, match="is not a run directory"):
        open_run(str(tmp_path))
