"""The in-process pipeline: rankings equal the plain definition, resume, unit sizes, bad input."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.config import ConfigError
from cigma_ray.data import DataError
from cigma_ray.engine.reference import scan_by_weight_zeroing
from cigma_ray.method import counterfactuals, head_scores, js, probs
from cigma_ray.models.attention import find_attentions
from cigma_ray.models.surgery import zeroed_head
from cigma_ray.pipeline import Pipeline, Worker, run_status, select_images
from cigma_ray.rundir import RunDir, StorageError

from helpers import FAST, cli, job, model_args, rankings, write_folder


def test_rankings_equal_the_weight_zeroing_definition(tmp_path, image_folder, tiny_checkpoint):
    p = Pipeline(job(tmp_path, image_folder, tiny_checkpoint), progress=False)
    p.run_all()
    run = RunDir(p.job.out)
    model = p.adapter.model

    # predictions and D, recomputed from scratch
    preds = run.read_folder("predictions").sort_by("image_id")
    ok = [r for r in p.source.records if not r.path.endswith("zz_broken.png")]
    images, _, _ = p.source.load(ok, p.loaded.transform)
    with torch.no_grad():
        expected_pred = model(images).argmax(1).numpy()
    assert preds["image_id"].to_pylist() == [r.image_id for r in ok]
    assert (preds["pred"].to_numpy() == expected_pred).all()
    selected = select_images([r.image_id for r, c in zip(ok, expected_pred == [r.label for r in ok]) if c], FAST.tp_ratio, 0)
    masks = run.read_folder("masks").sort_by("image_id")
    assert masks["image_id"].to_pylist() == selected
    fg = torch.from_numpy(np.stack(masks["fg"].to_numpy(zero_copy_only=False))).reshape(-1, 32, 32)
    assert (fg.reshape(len(selected), -1).sum(1) == 358).all()

    # the scan, by weight zeroing, one head at a time, whole model
    d_images = images[[ [r.image_id for r in ok].index(i) for i in selected ]]
    no_bg, no_fg = counterfactuals(d_images, fg)
    heads = p.adapter.heads
    big, fig = masks["big"].to_numpy(), masks["fig"].to_numpy()
    zeroed = scan_by_weight_zeroing(model, find_attentions(model), d_images, no_bg, heads, images_no_fg=no_fg)
    ablated, fig_ablated = zeroed.big.numpy().astype(np.float64), zeroed.fig.numpy().astype(np.float64)
    stats = head_scores(big[None, :] - ablated, bootstrap=200, ci_level=0.95, seed=0)
    got = rankings(p.job.out).sort_by([("layer", "ascending"), ("head", "ascending")])
    np.testing.assert_allclose(got["score"].to_numpy(), stats["score"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["ci_low"].to_numpy(), stats["ci_low"], rtol=0, atol=1e-6)
    assert np.abs(stats["score"]).max() > 1e-4
    # every score variant, by hand from the zeroed-weight gains (FAST measures FIG^(-h))
    by_hand = {"big_drop": (big - ablated).mean(axis=1),
               "bir_drop": (big / (fig + big) - ablated / (fig_ablated + ablated)).mean(axis=1),
               "big_minus_fig": ((big - ablated) - (fig - fig_ablated)).mean(axis=1)}
    for name, expected in by_hand.items():
        np.testing.assert_allclose(got[name].to_numpy(), expected, rtol=0, atol=1e-6, err_msg=name)
        assert sorted(got[f"{name}_rank"].to_pylist()) == list(range(1, len(heads) + 1))
    np.testing.assert_allclose(got["score"].to_numpy(), got["big_drop"].to_numpy(), rtol=0, atol=0)
    assert not np.allclose(by_hand["bir_drop"], by_hand["big_drop"])
    order = np.argsort(-stats["score"], kind="stable")
    assert [tuple(h) for h in np.array(heads)[order]] == list(zip(*(rankings(p.job.out)[c].to_pylist() for c in ("layer", "head"))))

    # the broken image is in failures/, nothing else is
    failures = run.read_folder("failures")
    assert failures["path"].to_pylist() == [os.path.join(image_folder, "a", "zz_broken.png")]


def test_results_do_not_depend_on_units_or_batch_size(tmp_path, image_folder, tiny_checkpoint):
    a = Pipeline(job(tmp_path, image_folder, tiny_checkpoint, "a"), progress=False)
    a.run_all()
    cfg = FAST.replace(unit_images=2, unit_layers=1, batch_size=3)
    b = Pipeline(job(tmp_path, image_folder, tiny_checkpoint, "b", cfg=cfg), progress=False)
    b.run_all()
    assert len(os.listdir(os.path.join(b.job.out, "deltas"))) > len(os.listdir(os.path.join(a.job.out, "deltas")))
    ra, rb = rankings(a.job.out), rankings(b.job.out)
    assert ra["rank"].to_pylist() == rb["rank"].to_pylist()
    assert ra.select(["layer", "head"]).equals(rb.select(["layer", "head"]))
    np.testing.assert_allclose(ra["score"].to_numpy(), rb["score"].to_numpy(), rtol=0, atol=1e-6)


def test_interrupted_run_resumes_without_redoing_units(tmp_path, image_folder, tiny_checkpoint, monkeypatch):
    reference = Pipeline(job(tmp_path, image_folder, tiny_checkpoint, "ref"), progress=False)
    reference.run_all()

    j = job(tmp_path, image_folder, tiny_checkpoint, "resumed")
    calls = {"n": 0}
    original = Worker.run_unit

    def crash_after_some_scan_units(self, unit, on_progress=None):
        if unit.stage == "scan":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated interruption")
        return original(self, unit, on_progress)

    monkeypatch.setattr(Worker, "run_unit", crash_after_some_scan_units)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(j, progress=False).run_all()
    monkeypatch.setattr(Worker, "run_unit", original)
    run = RunDir(j.out)
    assert not run.exists("rankings.parquet")
    before = {n: os.stat(run.path("deltas", n)).st_mtime_ns for n in run.list("deltas")}
    assert len(before) == 1

    done = []
    monkeypatch.setattr(Worker, "run_unit", lambda self, unit, cb=None: done.append(unit.file) or original(self, unit, cb))
    Pipeline(j, progress=False).run_all()
    assert done and all(f.startswith("deltas/") for f in done)  # predictions and masks were kept
    assert {n: os.stat(run.path("deltas", n)).st_mtime_ns for n in before} == before
    assert rankings(j.out).equals(rankings(reference.job.out))

    done.clear()  # a complete run does nothing but rank again
    Pipeline(j, progress=False).run_all()
    assert done == []


def test_top_k_larger_than_the_model_is_refused_early(tmp_path, image_folder, tiny_checkpoint):
    with pytest.raises(ConfigError, match="top_k=10: the model has 9 heads"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=FAST.replace(top_k=10)), progress=False)
    assert not (tmp_path / "run").exists()


def test_no_correct_image_is_a_clear_error(tmp_path, tiny_checkpoint):
    one = write_folder(tmp_path / "one", classes=("a", "b", "c"), per_class=1, size=32)
    p = Pipeline(job(tmp_path, one, tiny_checkpoint), progress=False)
    p.run_stage("predict", p.predict_units(), lambda u: 1, "img")
    preds = RunDir(p.job.out).read_folder("predictions")
    if preds["correct"].to_numpy().any():
        pytest.skip("the random model happened to classify an image correctly")
    with pytest.raises(DataError, match="classified correctly"):
        p.selected()


def test_rank_refuses_deltas_that_miss_or_repeat_cells(tmp_path, image_folder, tiny_checkpoint):
    j = job(tmp_path, image_folder, tiny_checkpoint)
    Pipeline(j, progress=False).run_all()
    run = RunDir(j.out)
    first, second = run.list("deltas")[:2]
    # first's cells twice, second's none: whole files with matching receipts, so only the ranking can tell
    run.write_unit(f"deltas/{second}", run.read_table(f"deltas/{first}"))
    with pytest.raises(StorageError, match=r"cells missing or repeated\): remove the run's deltas/ folder"):
        Pipeline(j, progress=False).run_all()


def test_iterative_rounds_rescan_the_rest_on_the_pruned_model(tmp_path, image_folder, tiny_checkpoint):
    """rounds=3, k_per_round=2: each round's scores are the weight-zeroing definition on the model with
    the earlier rounds' top heads zeroed throughout, BIG included; the ranking lists the removed heads
    in removal order, then the last round's ranking, each row with its round."""
    cfg = FAST.replace(rounds=3, k_per_round=2)
    p = Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=cfg), progress=False)
    p.run_all()
    run = RunDir(p.job.out)
    model = p.adapter.model
    masks = run.read_folder("masks").sort_by("image_id")
    ok = {r.image_id: r for r in p.source.records}
    images, _, _ = p.source.load([ok[i] for i in masks["image_id"].to_pylist()], p.loaded.transform)
    fg = torch.from_numpy(np.stack(masks["fg"].to_numpy(zero_copy_only=False))).reshape(-1, 32, 32)
    no_bg, _ = counterfactuals(images, fg)
    attentions = find_attentions(model)

    removed: list = []
    rounds = [run.read_table(f"rounds/round-{r:02d}.parquet") for r in range(3)]
    for r, table in enumerate(rounds):
        heads = [h for h in p.adapter.heads if h not in removed]
        ablated = scan_by_weight_zeroing(model, attentions, images, no_bg, heads, removed=removed).big.numpy()
        if removed:  # BIG of the pruned model: the same definition with only the removed heads zeroed
            with contextlib.ExitStack() as stack:
                for layer, head in removed:
                    stack.enter_context(zeroed_head(attentions[layer], head))
                with torch.no_grad():
                    big = js(probs(model(images)), probs(model(no_bg))).numpy()
        else:
            big = masks["big"].to_numpy()
        stats = head_scores(big[None, :] - ablated, bootstrap=200, ci_level=0.95, seed=0)
        got = table.sort_by([("layer", "ascending"), ("head", "ascending")])
        assert list(zip(got["layer"].to_pylist(), got["head"].to_pylist())) == heads
        np.testing.assert_allclose(got["score"].to_numpy(), stats["score"], rtol=0, atol=1e-6)
        removed += [(row["layer"], row["head"]) for row in table.slice(0, 2).to_pylist()]
    assert len(set(removed)) == 6

    final = rankings(p.job.out)
    assert final["rank"].to_pylist() == list(range(1, len(p.adapter.heads) + 1))
    assert final["round"].to_pylist() == [0, 0, 1, 1] + [2] * (len(p.adapter.heads) - 4)
    assert list(zip(final["layer"].to_pylist(), final["head"].to_pylist()))[:4] == removed[:4]
    assert_one_notion_of_rank(p.job.out, removed[:4])
    status = run_status(run)["stages"]
    shards = -(-masks.num_rows // FAST.unit_images)
    assert status["scan"] == status["scan round 1"] == status["scan round 2"] == (shards, shards)
    with pytest.raises(ConfigError, match="rounds=5 with k_per_round=3 would remove 12 of the 9 heads"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, name="too-many", cfg=FAST.replace(rounds=5, k_per_round=3)))


def test_measure_fig_off_keeps_the_paper_score_only(tmp_path, image_folder, tiny_checkpoint):
    path, model, kwargs = tiny_checkpoint
    cfg = tmp_path / "c.yaml"
    cfg.write_text("measure_fig: false\ntp_ratio: 0.4\nmask_steps: 2\nmask_batch: 4\nbootstrap: 50\ntop_k: 0.2\n")
    out = str(tmp_path / "run")
    shown = cli("scan", "--model", f"timm:{model}", "--checkpoint", path, "--model-kwargs", *model_args(kwargs),
                  "--data", image_folder, "--out", out, "--config", str(cfg), "--quiet").stdout
    assert "top 2 heads by big_drop" in shown  # 0.2 of 9 heads = 1.8 -> 2
    assert "bir_drop and big_minus_fig are not available" in shown
    deltas = pq.read_table(os.path.join(out, "deltas"))
    assert "fig_ablated" not in deltas.column_names
    assert "bir_drop" not in pq.read_table(os.path.join(out, "rankings.parquet")).column_names
    bad = cli("sweep", out, "--k", "1", "--scores", "bir_drop", check=False)
    assert bad.returncode == 2 and "did not measure FIG" in bad.stderr


def test_damaged_unit_files_are_reported_and_redone(tmp_path, fast_run_dir, monkeypatch, capsys):
    """Unit files are checked against the sha256 of their receipts: `status` names damaged ones, a re-run redoes
    exactly those (a file from before receipts were kept is checked by parsing it, then adopted), and ranking
    never meets a truncated file."""
    import shutil

    from cigma_ray.cli import main
    from cigma_ray.pipeline import Job

    out = str(tmp_path / "run")
    shutil.copytree(fast_run_dir, out)
    run = RunDir(out)
    before = rankings(out)
    deltas, masks = run.list("deltas"), run.list("masks")
    truncated, flipped, legacy = f"deltas/{deltas[1]}", f"masks/{masks[0]}", f"deltas/{deltas[0]}"
    with open(run.path(truncated), "r+b") as f:
        f.truncate(os.path.getsize(run.path(truncated)) // 2)
    with open(run.path(flipped), "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(run.path(flipped)) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.remove(run.path("receipts", legacy + ".json"))

    status = run_status(run)
    assert set(status["damaged"]) == {truncated, flipped}
    assert "checksum mismatch" in status["damaged"][truncated] and "bytes" in status["damaged"][truncated]
    assert status["stages"]["mask"][1] - status["stages"]["mask"][0] == 1
    assert status["stages"]["scan"][1] - status["stages"]["scan"][0] == 1  # the legacy file counts as done
    assert main(["status", out]) == 0
    printed = capsys.readouterr().out
    assert f"damaged  {truncated}: checksum mismatch" in printed and "run the same scan command again" in printed

    done = []
    original = Worker.run_unit
    monkeypatch.setattr(Worker, "run_unit", lambda self, unit, cb=None: done.append(unit.file) or original(self, unit, cb))
    meta = run.read_json("run.json")
    Pipeline(Job.of_run(meta, out), progress=False).run_all()
    assert sorted(done) == sorted([truncated, flipped])
    assert "redoing 1 damaged unit file(s): masks/" in capsys.readouterr().err
    assert rankings(out).equals(before)
    assert run.exists("receipts", legacy + ".json")  # adopted: checked by checksum from now on
    assert run_status(run)["damaged"] == {}


def test_a_damaged_file_outside_units_is_a_named_error(tmp_path, scored_run, capsys):
    """A truncated rankings.parquet: `show` says which file and what to do, exit 2, no ArrowInvalid traceback."""
    import shutil

    from cigma_ray.cli import main

    out = str(tmp_path / "run")
    shutil.copytree(scored_run, out)
    path = os.path.join(out, "rankings.parquet")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    assert main(["show", out]) == 2
    err = capsys.readouterr().err
    assert "rankings.parquet is damaged" in err and "Traceback" not in err and len(err.splitlines()) <= 2


def assert_one_notion_of_rank(out: str, removed: list) -> None:
    """prune, sweep and --auto-k (control_heads, the run's top_heads), export (chosen_heads), show (the printed table)
    and report (the heads listed) remove or show the same heads, for every K: the removed heads first, in order."""
    from cigma_ray.evaluation.experiments import control_heads
    from cigma_ray.export import chosen_heads
    from cigma_ray.reports.pruning import heads_lines
    from cigma_ray.reports.run import top_heads_text
    from cigma_ray.rundir import open_run

    run = open_run(out)
    table = run.rankings()
    order = list(zip(table.sort_by("rank")["layer"].to_pylist(), table.sort_by("rank")["head"].to_pylist()))
    assert order[: len(removed)] == removed
    assert table[f"{run.score}_rank"].to_pylist() == table["rank"].to_pylist()
    for k in range(1, run.n_heads + 1):
        prune = control_heads(run, run.heads, k, [0], [run.score])[0][2]
        export = chosen_heads(run, k, None, run.score)[0]
        shown = [tuple(map(int, line.split()[1:3])) for line in top_heads_text(run, k).splitlines()[-k:]]
        listed = heads_lines(run, [k], [run.score])[0].split(": ", 1)[1].split()
        assert prune == export == shown == order[:k] == [tuple(map(int, h.split("."))) for h in listed], k


def test_iterative_rounds_keep_their_unit_identity_in_failures(tmp_path, fast_run_dir, image_folder):
    """An image unreadable in round 1's scan is recorded under round 1's unit, never over round 0's failures file."""
    import shutil
    from dataclasses import replace

    from cigma_ray.pipeline import Job
    from cigma_ray.pipeline.units import scan_units

    out, data = str(tmp_path / "run"), str(tmp_path / "data")
    shutil.copytree(fast_run_dir, out)
    shutil.copytree(image_folder, data)
    run = RunDir(out)
    job = replace(Job.of_run(run.read_json("run.json"), out), data=data)
    worker = Worker(job)
    selected = sorted(run.read_folder("masks")["image_id"].to_pylist())
    heads_per_layer = worker.loaded.adapter.heads_per_layer
    round0 = scan_units(selected, job.config, heads_per_layer)[0]
    round1 = scan_units(selected, job.config, heads_per_layer, 1, [(0, 0)])[0]
    assert round0.failure_file != round1.failure_file
    with open(worker.source.records[round1.image_ids[0]].path, "wb") as f:
        f.write(b"no longer an image")
    worker.run_unit(round1)
    assert not run.exists(round0.failure_file)
    failures = run.read_table(round1.failure_file).to_pylist()
    assert [(f["kind"], f["unit"], f["image_id"]) for f in failures] == [("image", round1.file, round1.image_ids[0])]
    assert round1.file.startswith("deltas/round-01/")


def test_the_mask_stage_ticks_per_optimisation_step(tmp_path, fast_run_dir, capsys):
    """A mask unit reported its images once, at its end (a 39-image unit showed 0/39 for minutes): it now ticks once
    per optimisation step, and the stage's bar counts image-steps."""
    import shutil

    from cigma_ray.pipeline import Job
    from cigma_ray.pipeline.units import mask_units

    out = str(tmp_path / "run")
    shutil.copytree(fast_run_dir, out)
    run = RunDir(out)
    job = Job.of_run(run.read_json("run.json"), out)
    selected = sorted(run.read_folder("masks")["image_id"].to_pylist())
    unit = Pipeline(job, progress=False).mask_units(selected)[0]  # with its images' donors (measure_swap)
    ticks = []
    Worker(job).run_unit(unit, ticks.append)
    assert ticks == [len(unit.image_ids)] * job.config.mask_steps

    os.remove(run.path(unit.file))
    os.remove(run.path("receipts", unit.file + ".json"))
    Pipeline(job, progress=True).run_all()
    err = capsys.readouterr().err
    total = sum(len(u.image_ids) for u in mask_units(selected, job.config))
    assert f"/{total * job.config.mask_steps}" in err and "img-step/s" in err


# A scan whose mask units (60 steps) and scan units (one image each) are long enough to be interrupted in the middle.
KILLED = FAST.replace(mask_steps=60, unit_images=1, bootstrap=50)
KILLED_YAML = "".join(f"{k}: {getattr(KILLED, k)}\n" for k in ("tp_ratio", "mask_steps", "mask_batch", "unit_images",
                                                                 "bootstrap", "top_k", "batch_size"))


def killed_scan_args(tmp_path, image_folder, tiny_checkpoint) -> list[str]:
    path, name, kwargs = tiny_checkpoint
    (tmp_path / "killed.yaml").write_text(KILLED_YAML)
    return ["scan", "--model", f"timm:{name}", "--checkpoint", path, "--model-kwargs", *model_args(kwargs),
            "--data", image_folder, "--out", str(tmp_path / "run"), "--config", str(tmp_path / "killed.yaml"), "--quiet"]


def test_sigkill_during_the_mask_stage_and_the_scan_resumes_to_the_same_rankings(tmp_path, image_folder,
                                                                                  tiny_checkpoint):
    """The real command (a process of its own, in-process run) killed with SIGKILL in the middle of the mask stage,
    run again and killed in the middle of the scan, then run to the end: its rankings are an uninterrupted run's."""
    import signal

    from helpers import interrupt_when

    reference = Pipeline(job(tmp_path, image_folder, tiny_checkpoint, "reference", cfg=KILLED), progress=False)
    reference.run_all()
    units = {folder: len(RunDir(reference.job.out).list(folder)) for folder in ("masks", "deltas")}
    assert units["masks"] >= 2 and units["deltas"] >= 3
    args = killed_scan_args(tmp_path, image_folder, tiny_checkpoint)
    run = RunDir(str(tmp_path / "run"))

    killed = interrupt_when(args, run.path("masks"), signal.SIGKILL)
    assert killed is not None and killed.returncode == -signal.SIGKILL
    assert 1 <= len(run.list("masks")) < units["masks"] and not run.exists("deltas")  # killed during the mask stage

    killed = interrupt_when(args, run.path("deltas"), signal.SIGKILL)
    assert killed is not None and killed.returncode == -signal.SIGKILL
    assert len(run.list("masks")) == units["masks"] and 1 <= len(run.list("deltas")) < units["deltas"]
    assert not run.exists("rankings.parquet")  # killed during the scan

    cli(*args)
    assert run_status(run)["damaged"] == {}
    got, want = rankings(run.url), rankings(reference.job.out)
    assert got.select(["layer", "head", "rank"]).equals(want.select(["layer", "head", "rank"]))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-9)


def test_ctrl_c_exits_130_saying_the_same_command_resumes(tmp_path, image_folder, tiny_checkpoint):
    import signal

    from helpers import interrupt_when

    args = killed_scan_args(tmp_path, image_folder, tiny_checkpoint)
    stopped = interrupt_when(args, str(tmp_path / "run" / "masks"), signal.SIGINT)
    assert stopped is not None and stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == ("cigma-ray scan: interrupted; finished units are kept: run the "
                                                       "same command again to resume")
