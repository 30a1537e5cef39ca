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
    with pytest.raises(RunMismatch, match="image listing") as refused:
        Pipeline(job(tmp_path, other, tiny_checkpoint), progress=False)
    # the image count changed, not the units: the message says so and does not blame unit_images
    assert "(9 images now, 31 in the run)" in str(refused.value) and "unit_images" not in str(refused.value)
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


def test_out_at_or_inside_the_data_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint, capsys):
    """A run inside its image folder made the folder a Parquet table for the next command; locally (however the path
    is spelled) and on object storage (by bucket and key prefix), without a request."""
    from cigma_ray.cli import main
    from cigma_ray.models import ModelSpec
    from cigma_ray.pipeline import Job
    from cigma_ray.rundir import within

    assert within("s3://b/images/run", "s3://b/images") and within("s3://b/images/", "s3://b/images")
    assert within("s3://b/images", "s3://b/images/") and within("s3://b/images/x/../run", "s3://b/images")
    assert not within("s3://b/images2/run", "s3://b/images") and not within("s3://c/images/run", "s3://b/images")
    assert not within(str(tmp_path / "images"), "s3://b" + str(tmp_path / "images"))
    data = write_folder(tmp_path / "images", per_class=2)
    os.symlink(data, tmp_path / "link")
    listing = sorted(os.walk(data))
    path, name, kwargs = tiny_checkpoint
    spec = ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)
    for out in (data, f"{data}/", f"{data}/run", str(tmp_path / "link" / "run"), f"{tmp_path}/other/../images/a/run"):
        with pytest.raises(StorageError, match=r"--out .* (is|is inside) --data .*choose an --out outside"):
            Pipeline(Job(model=spec, data=data, out=out, config=FAST), progress=False)
        assert main(["scan", "--model", f"timm:{name}", "--checkpoint", path, "--data", data, "--out", out]) == 2
        assert "choose an --out outside" in capsys.readouterr().err
    assert main(["scan", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--data", "s3://bucket/images",
                 "--out", "s3://bucket/images/runs/x"]) == 2
    assert "is inside --data s3://bucket/images" in capsys.readouterr().err
    assert sorted(os.walk(data)) == listing  # nothing was written among the images
    # a run's eval/ files among eval images: refused too (eval data inside the run, as the demo has, is fine)
    assert main(["prune", f"{data}/run", "--eval-data", data]) == 2
    assert "the run directory" in capsys.readouterr().err
    assert main(["sweep", "s3://bucket/images/runs/x", "--k", "1", "--eval-data", "s3://bucket/images"]) == 2
    assert "is inside --eval-data s3://bucket/images" in capsys.readouterr().err


def test_out_an_existing_file_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from cigma_ray.cli import main
    from cigma_ray.models import registry

    monkeypatch.setattr(registry, "LOADERS", {})  # any model load would fail loudly
    data = write_folder(tmp_path / "images", per_class=1)
    (tmp_path / "file").write_text("mine")
    assert main(["scan", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--data", data,
                 "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is an existing file" in err and "unknown model family" not in err
    assert (tmp_path / "file").read_text() == "mine"

