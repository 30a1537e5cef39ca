"""The pipeline with mean ablation and the background swap: the means stage (units, resume, files), donors in
masks/ (seeded, of another predicted class, in any shard), rankings equal to the plain definitions, and a Ray
run equal to an in-process one."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cigma_ray.config import Config
from cigma_ray.engine.reference import scan_by_mean_substitution
from cigma_ray.method import choose_donors, counterfactuals, head_scores, js, probs, swapped
from cigma_ray.models import ModelSpec
from cigma_ray.pipeline import Job, Pipeline, run_status
from cigma_ray.rundir import RunDir, RunMismatch, decode_fg, head_means, open_run

from helpers import labelled_folder, rankings

CFG = Config(tp_ratio=1.0, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=100, top_k=3, batch_size=8,
             ablation="mean", score="swap_drop", measure_swap=True)




@pytest.fixture(scope="module")
def spec(tiny_checkpoint):
    path, name, kwargs = tiny_checkpoint
    return ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory, spec):
    folder = labelled_folder(tmp_path_factory.mktemp("swapdata") / "images", spec, n=14, seed=3)
    assert len(os.listdir(folder)) >= 2  # D holds several predicted classes (donors)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spec, data):
    p = Pipeline(Job(model=spec, data=data, out=str(tmp_path_factory.mktemp("mean") / "run"), config=CFG),
                 progress=False)
    p.run_all()
    return p


def test_mean_ablation_run_equals_the_definitions(reference):
    p = reference
    run = RunDir(p.job.out)
    model = p.adapter.model
    masks = run.read_folder("masks").sort_by("image_id")
    ids = masks["image_id"].to_pylist()
    records = [p.source.records[i] for i in ids]
    images, ok, _ = p.source.load(records, p.loaded.transform)
    assert len(ok) == len(ids) >= 8

    # donors: seeded, among D, of another predicted class, some in another mask unit's shard
    preds = run.read_folder("predictions").sort_by("image_id")
    pred_of = dict(zip(preds["image_id"].to_pylist(), preds["pred"].to_pylist()))
    donors = masks["donor"].to_pylist()
    expected = choose_donors([pred_of[i] for i in ids], CFG.seed)[:, 0]
    assert donors == [ids[d] for d in expected]
    assert all(pred_of[d] != pred_of[i] for i, d in zip(ids, donors))
    shard = {i: k // CFG.mask_batch for k, i in enumerate(ids)}
    assert any(shard[d] != shard[i] for i, d in zip(ids, donors))
    donor_images = images[[ids.index(d) for d in donors]]
    fg = decode_fg(masks["fg"], CFG.mask_size)
    swap = swapped(images, fg, donor_images)
    with torch.no_grad():
        intact_swap = js(probs(model(images)), probs(model(swap))).numpy()
    np.testing.assert_allclose(masks["swap"].to_numpy(), intact_swap, rtol=0, atol=1e-6)

    # means/: one unit per image shard of D; each head's mean output over D's images and tokens
    assert sorted(os.listdir(os.path.join(p.job.out, "means"))) == \
        [f"part-{k:05d}.parquet" for k in range(-(-len(ids) // CFG.unit_images))]
    seen: dict[int, list] = {}
    hooks = [b.attn.proj.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0]))
             for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    means = head_means(run, len(ids))
    for layer, xs in seen.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
        np.testing.assert_allclose(means[layer], x.mean(0).numpy(), rtol=0, atol=1e-6)

    # every score from the definition: each head's output replaced by its mean, whole model, one head at a time
    no_bg, no_fg = counterfactuals(images, fg)
    pairs = [(b.attn.proj, b.attn.num_heads) for b in model.blocks]
    ref = scan_by_mean_substitution(model, pairs, [torch.from_numpy(m).float() for m in means], images, no_bg,
                                    p.adapter.heads, images_no_fg=no_fg, images_swap=swap)
    big, fig, sw = (masks[c].to_numpy() for c in ("big", "fig", "swap"))
    ablated, fig_ablated, swap_ablated = (t.numpy().astype(np.float64) for t in ref)
    by_hand = {"big_drop": (big - ablated).mean(axis=1),
               "bir_drop": (big / (fig + big) - ablated / (fig_ablated + ablated)).mean(axis=1),
               "big_minus_fig": ((big - ablated) - (fig - fig_ablated)).mean(axis=1),
               "swap_drop": (sw - swap_ablated).mean(axis=1)}
    got = rankings(p.job.out).sort_by([("layer", "ascending"), ("head", "ascending")])
    for name, want in by_hand.items():
        np.testing.assert_allclose(got[name].to_numpy(), want, rtol=0, atol=1e-6, err_msg=name)
    stats = head_scores(sw[None, :] - swap_ablated, bootstrap=CFG.bootstrap, ci_level=0.95, seed=0)
    np.testing.assert_allclose(got["score"].to_numpy(), stats["score"], rtol=0, atol=1e-6)  # ranked by swap_drop
    np.testing.assert_allclose(got["ci_high"].to_numpy(), stats["ci_high"], rtol=0, atol=1e-6)
    assert np.abs(by_hand["swap_drop"]).max() > 1e-4
    deltas = run.read_folder("deltas")
    assert {"swap", "swap_ablated", "fig", "fig_ablated"} <= set(deltas.column_names)
    assert open_run(p.job.out).scores == ["big_drop", "bir_drop", "big_minus_fig", "swap_drop"]


def test_the_means_stage_resumes_and_the_ablation_is_part_of_the_run(reference, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(reference.job.out, out)
    os.remove(os.path.join(out, "means", "part-00001.parquet"))
    for name in os.listdir(os.path.join(out, "deltas"))[:2]:
        os.remove(os.path.join(out, "deltas", name))
    os.remove(os.path.join(out, "rankings.parquet"))
    status = run_status(RunDir(out))
    assert status["stages"]["means"][1] - status["stages"]["means"][0] == 1
    job = Job(model=reference.job.model, data=reference.job.data, out=out, config=CFG)
    Pipeline(job, progress=False).run_all()
    a, b = rankings(out), rankings(reference.job.out)
    assert a.select(["layer", "head"]).equals(b.select(["layer", "head"]))
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=0, atol=1e-9)
    with pytest.raises(RunMismatch, match="ablation: run has 'mean', this command 'zero'"):
        Pipeline(Job(model=job.model, data=job.data, out=out, config=CFG.replace(ablation="zero")), progress=False)
    # a run opened for evaluation ablates with its means
    lm = open_run(out).load_model()
    assert all(m is not None for m in lm.adapter.gates.means)


@pytest.mark.timeout(400)
def test_a_ray_run_equals_the_in_process_run(reference, tmp_path):
    import ray

    from cigma_ray.distributed import ray_executor

    ray_tmp = tempfile.mkdtemp(prefix="cgr", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        job = Job(model=reference.job.model, data=reference.job.data, out=str(tmp_path / "ray"), config=CFG)
        pipeline = Pipeline(job, progress=False)
        with ray_executor(pipeline.job, "local", 2, num_cpus=2) as executor:
            pipeline.run_all(executor)
        assert not ray.is_initialized()
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(ray_tmp, ignore_errors=True)
    got, want = (pq.read_table(os.path.join(o, "rankings.parquet")) for o in (job.out, reference.job.out))
    assert got.select(["layer", "head"]).equals(want.select(["layer", "head"]))
    for column in ("swap_drop", "big_drop", "bir_drop", "ci_low"):
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=0, atol=1e-6, err_msg=column)
    for folder in ("means", "masks"):
        assert sorted(os.listdir(os.path.join(job.out, folder))) == sorted(os.listdir(os.path.join(reference.job.out, folder)))
    assert pq.read_table(os.path.join(job.out, "masks")).sort_by("image_id")["donor"].equals(
        pq.read_table(os.path.join(reference.job.out, "masks")).sort_by("image_id")["donor"])
