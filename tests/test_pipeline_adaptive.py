"""The adaptive scan end to end in this process (pipeline/adaptive.py): its top K equals the exhaustive scan's on
random-weight ViTs, a ViT with registers and the demo model; resume, status and the run directory's checks.

Each case scans exhaustively once, then copies predictions/ and masks/ into a fresh run directory and scans it
adaptively: the same D and masks, as the guarantee states it."""
from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.config import Config, ConfigError
from cigma_ray.models import ModelSpec
from cigma_ray.pipeline import Job, Pipeline, Worker, run_status
from cigma_ray.rundir import RunDir, RunMismatch

from helpers import VIT_KINDS, labelled_folder, perturb, write_folder

# tp_ratio 1 (every correctly classified image in D), few mask steps, small units; delta 0.5 and short first
# rounds so that heads do leave early on these small D (the guarantee holds at any delta)
CFG = Config(tp_ratio=1.0, mask_steps=3, mask_batch=16, unit_images=16, bootstrap=0, top_k=3, batch_size=32)
ADAPTIVE = dict(adaptive=True, delta=0.5, adaptive_first=8, adaptive_growth=1.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_vit(root, kind: str, **overrides) -> ModelSpec:
    """A perturbed random-weight timm ViT of VIT_KINDS saved as a checkpoint (3 classes)."""
    import timm

    name, kwargs = VIT_KINDS[kind]
    kwargs = {**kwargs, **overrides}
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, num_classes=3, **kwargs), scale=0.3)
    path = os.path.join(root, f"{kind}.pth")
    torch.save(model.state_dict(), path)
    return ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)


def exhaustive_then_adaptive(root, spec: ModelSpec, data: str, cfg: Config, **adaptive):
    """(exhaustive pipeline, adaptive pipeline) of the same job, the second on the first's predictions and masks."""
    exhaustive = Pipeline(Job(model=spec, data=data, out=str(root / "exhaustive"), config=cfg), progress=False)
    exhaustive.run_all()
    out = root / "adaptive"
    out.mkdir()
    for folder in ("predictions", "masks"):
        shutil.copytree(root / "exhaustive" / folder, out / folder)
    pipeline = Pipeline(Job(model=spec, data=data, out=str(out), config=cfg.replace(**adaptive)), progress=False)
    pipeline.run_all()
    return exhaustive, pipeline


def check_same_top_k(exhaustive: Pipeline, adaptive: Pipeline) -> pq.Table:
    """The adaptive top-K set is the exhaustive one; the ranking is well formed; heads measured on all of D
    have the exhaustive score (up to float rounding of other batch compositions)."""
    cfg = adaptive.cfg
    want = pq.read_table(os.path.join(exhaustive.job.out, "rankings.parquet"))
    got = pq.read_table(os.path.join(adaptive.job.out, "rankings.parquet"))
    heads = adaptive.adapter.scanned_heads
    k = cfg.k_of(len(heads))
    top = lambda t: {(r["layer"], r["head"]) for r in t.slice(0, k).select(["layer", "head"]).to_pylist()}
    assert top(got) == top(want)
    assert got.num_rows == len(heads) and got["rank"].to_pylist() == list(range(1, len(heads) + 1))
    assert got["in_top_k"].to_pylist() == [True] * k + [False] * (len(heads) - k)
    n_images = len(adaptive.selected())
    exact = {(r["layer"], r["head"]): r["score"] for r in want.to_pylist()}
    for r in got.to_pylist():
        assert 1 <= r["n"] <= n_images and r["decided_early"] == (r["n"] < n_images)
        assert r["ci_low"] <= r["score"] + 1e-12 and r["score"] <= r["ci_high"] + 1e-12
        assert r[cfg.score] == r["score"] and r[f"{cfg.score}_rank"] == r["rank"]
        if r["n"] == n_images:
            assert r["score"] == pytest.approx(exact[(r["layer"], r["head"])], abs=1e-6)
        assert exact[(r["layer"], r["head"])] >= r["ci_low"] - 1e-6 and exact[(r["layer"], r["head"])] <= r["ci_high"] + 1e-6
    summary = RunDir(adaptive.job.out).read_json("adaptive.json")
    assert summary["finished"] and summary["k"] == k and summary["pairs"] == int(got["n"].to_numpy().sum())
    return got


@pytest.mark.parametrize("kind, overrides, adaptive", [
    ("vit", dict(embed_dim=64, depth=4, num_heads=8), {}),  # 32 heads
    ("dinov2_reg", {}, {"adaptive_order": "screen"}),  # register tokens; the pre-screen orders the work
])
def test_adaptive_top_k_equals_the_exhaustive_one_on_random_vits(tmp_path, kind, overrides, adaptive):
    spec = random_vit(tmp_path, kind, **overrides)
    size = VIT_KINDS[kind][1]["img_size"]
    data = labelled_folder(tmp_path / "data", spec, n=150, size=size)
    exhaustive, pipeline = exhaustive_then_adaptive(tmp_path, spec, data, CFG, **ADAPTIVE, **adaptive)
    got = check_same_top_k(exhaustive, pipeline)
    assert got["decided_early"].to_numpy().any(), "no head left early: the test would not test the bounds"
    assert sum(got["n"].to_numpy()) < len(got) * len(pipeline.selected())
    if adaptive.get("adaptive_order") == "screen":
        run = RunDir(pipeline.job.out)
        assert len(run.list("screen")) == len(pipeline.mask_units(pipeline.selected()))
        assert run.read_json("adaptive.json")["lead"]  # its best heads led


def test_adaptive_scan_with_mean_ablation_equals_the_exhaustive_one(tmp_path):
    """ablation: mean: every round's units substitute the heads' means over D (the same means/ stage as the
    exhaustive scan's), and the pre-screen's gradients are those of mean ablation; the top K is the exhaustive
    mean-ablation scan's."""
    spec = random_vit(tmp_path, "vit", embed_dim=64, depth=4, num_heads=8)
    data = labelled_folder(tmp_path / "data", spec, n=150, size=VIT_KINDS["vit"][1]["img_size"])
    cfg = CFG.replace(ablation="mean")
    exhaustive, pipeline = exhaustive_then_adaptive(tmp_path, spec, data, cfg, **ADAPTIVE, adaptive_order="screen")
    check_same_top_k(exhaustive, pipeline)
    run = RunDir(pipeline.job.out)
    assert run.list("means") and run.read_json("adaptive.json")["finished"]


def test_adaptive_scan_leaves_out_the_layers_a_vision_language_model_does_not_read(tmp_path):
    """LLaVA reads vision layer 0's output: layer 1's heads are in no round and not ranked (as in the exhaustive
    scan), and the pre-screen's lead heads are picked among the scanned ones."""
    from hf_tiny import save_llava

    spec = ModelSpec(f"hf:{save_llava(str(tmp_path / 'llava'))}", heads="vision+text")
    data = write_folder(str(tmp_path / "images"), classes=("cat", "red bus", "red car"), per_class=4, size=32)
    cfg = CFG.replace(mask_batch=4, unit_images=4, batch_size=8)
    exhaustive, pipeline = exhaustive_then_adaptive(tmp_path, spec, data, cfg, **ADAPTIVE, adaptive_order="screen")
    assert list(pipeline.adapter.skipped_layers) == [1] and pipeline.selected()
    got = check_same_top_k(exhaustive, pipeline)
    assert 1 not in set(got["layer"].to_pylist())
    assert run_status(RunDir(pipeline.job.out))["adaptive"]["finished"]
    # `cigma-ray screen` on the exhaustive run: estimates of the scanned heads only, set against its exact scores
    from cigma_ray.cli import main

    assert main(["screen", exhaustive.job.out, "--quiet"]) == 0
    screened = pq.read_table(os.path.join(exhaustive.job.out, "screen.parquet"))
    assert list(zip(screened["layer"].to_pylist(), screened["head"].to_pylist())) == pipeline.adapter.scanned_heads
    assert RunDir(exhaustive.job.out).read_json("screen.json")["fidelity"]


def test_adaptive_top_k_equals_the_exhaustive_one_on_the_demo_model(tmp_path):
    from cigma_ray.data.demo import ensure_demo_data
    from cigma_ray.demo.run import demo_job

    data = ensure_demo_data(tmp_path / "data", splits=("scan",))["scan"]
    spec = demo_job(str(tmp_path / "x"), tmp_path / "data").model
    cfg = Config(tp_ratio=0.3, mask_steps=5, mask_batch=32, unit_images=32, bootstrap=0, top_k=3, batch_size=64)
    exhaustive, pipeline = exhaustive_then_adaptive(tmp_path, spec, str(data), cfg, adaptive=True, delta=0.2,
                                                    adaptive_first=16, adaptive_growth=1.5)
    # the demo's scores differ by 1e-4 to 1e-2 in a range of 1.4: at this D no head can leave early (a head g below
    # the K-th needs about 14.5 / g images), so this checks the path on the demo model, ending on the exhaustive means
    check_same_top_k(exhaustive, pipeline)


def test_interrupted_adaptive_scan_resumes_to_the_same_ranking(tmp_path, monkeypatch):
    spec = random_vit(tmp_path, "vit")
    data = labelled_folder(tmp_path / "data", spec, n=80, size=32)
    cfg = CFG.replace(unit_images=4, unit_layers=1, **ADAPTIVE)
    reference = Pipeline(Job(model=spec, data=data, out=str(tmp_path / "ref"), config=cfg), progress=False)
    reference.run_all()
    want = pq.read_table(os.path.join(reference.job.out, "rankings.parquet"))

    job = Job(model=spec, data=data, out=str(tmp_path / "run"), config=cfg)
    original = Worker.run_unit
    calls = {"n": 0}

    def crash_in_the_third_round(self, unit, on_progress=None):
        if unit.subdir == "adaptive/round-002":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated interruption")
        return original(self, unit, on_progress)

    monkeypatch.setattr(Worker, "run_unit", crash_in_the_third_round)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(job, progress=False).run_all()
    monkeypatch.setattr(Worker, "run_unit", original)
    run = RunDir(job.out)
    assert not run.exists("rankings.parquet")
    status = run_status(run)
    assert status["stages"]["adaptive round 0"][0] == status["stages"]["adaptive round 0"][1]
    assert status["stages"]["adaptive round 2"] == (2, status["stages"]["adaptive round 2"][1])
    assert "adaptive round 3" not in status["stages"] and not status["adaptive"]["finished"]
    kept = {f"{folder}/{n}": os.stat(run.path("deltas", folder, n)).st_mtime_ns
            for folder in ("adaptive/round-000", "adaptive/round-001", "adaptive/round-002")
            for n in run.list(f"deltas/{folder}")}

    done = []
    monkeypatch.setattr(Worker, "run_unit", lambda self, unit, cb=None: done.append(unit.file) or original(self, unit, cb))
    Pipeline(job, progress=False).run_all()
    assert done and all(f.startswith("deltas/adaptive/") for f in done)
    assert not {f.removeprefix("deltas/") for f in done} & set(kept)  # finished units were read back, not redone
    assert {f: os.stat(run.path("deltas", f)).st_mtime_ns for f in kept} == kept
    assert pq.read_table(os.path.join(job.out, "rankings.parquet")).equals(want)
    assert run_status(run)["adaptive"]["finished"]

    done.clear()  # a finished adaptive run replays its rounds from disk and runs nothing
    Pipeline(job, progress=False).run_all()
    assert done == []


def test_adaptive_run_directory_checks(tmp_path, image_folder, tiny_checkpoint):
    from helpers import job

    with pytest.raises(ConfigError, match="adaptive: true with rounds=2"):
        CFG.replace(adaptive=True, rounds=2)
    for bad in ({"delta": 0.0}, {"delta": 1.5}, {"adaptive_first": 0}, {"adaptive_growth": 1.0},
                {"adaptive_order": "random"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CFG.replace(**bad)
    cfg = CFG.replace(tp_ratio=0.4, **ADAPTIVE)
    Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=cfg), progress=False).run_all()
    # K decides what an adaptive scan measures: another top_k (a free key for an exhaustive run) is refused
    with pytest.raises(RunMismatch, match="top_k: run has 3, this command 2"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=cfg.replace(top_k=2)), progress=False)
    with pytest.raises(RunMismatch, match="delta"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=cfg.replace(delta=0.1)), progress=False)
    with pytest.raises(RunMismatch, match="adaptive: run has True"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=CFG.replace(tp_ratio=0.4)), progress=False)
