"""Issue 13: opt-in early stopping of the masks (mask_tol), reproducible bit for bit and per image."""
from __future__ import annotations

import json

import pytest
import torch

from cigma_ray.config import Config, ConfigError, from_dict
from cigma_ray.method import optimise_masks, probs
from cigma_ray.models import ModelSpec, load

from helpers import VIT_KINDS, finished_run, perturb

STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    name, kwargs = VIT_KINDS["vit"]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=4, model_kwargs=kwargs))
    perturb(lm.adapter.model, 0)
    images = torch.randn(5, 3, *lm.adapter.input_size, generator=torch.Generator().manual_seed(0))
    logits_fn = lm.adapter.logits
    with torch.no_grad():
        q = probs(logits_fn(images))
    return logits_fn, images, q


def fit(problem, **kw):
    logits_fn, images, q = problem
    return optimise_masks(logits_fn, images, q, mask_size=8, mask_steps=STEPS, **kw)


def test_off_by_default_and_zero_tolerance_is_the_fixed_step_count(problem):
    plain = fit(problem)
    masks, steps = fit(problem, mask_tol=0.0, return_steps=True)
    assert torch.equal(masks, plain) and (steps == STEPS).all()


def test_each_mask_is_its_own_trajectory_cut_at_its_own_stop(problem):
    """Bit for bit the mask of a run with mask_steps = the image's own stopping step, whatever the
    other images of the batch did; and the same inputs give the same masks."""
    masks, steps = fit(problem, mask_tol=2e-3, mask_window=5, return_steps=True)
    again, steps_again = fit(problem, mask_tol=2e-3, mask_window=5, return_steps=True)
    assert torch.equal(masks, again) and torch.equal(steps, steps_again)
    assert len(set(steps.tolist())) > 1 and steps.min() >= 5 and steps.max() <= STEPS  # they stop at different steps
    logits_fn, images, q = problem
    for i, s in enumerate(steps.tolist()):
        alone = optimise_masks(logits_fn, images, q, mask_size=8, mask_steps=s)
        assert torch.equal(masks[i], alone[i]), (i, s)


def test_a_loose_tolerance_stops_every_mask_after_one_window(problem):
    masks, steps = fit(problem, mask_tol=10.0, mask_window=3, return_steps=True)
    assert (steps == 3).all()
    logits_fn, images, q = problem
    assert torch.equal(masks, optimise_masks(logits_fn, images, q, mask_size=8, mask_steps=3))


def test_early_stop_with_micro_batches_cuts_the_micro_batched_trajectories(problem):
    """mask_tol with mask_micro_batch: each mask is the micro-batched run's mask at its own stopping step
    (the stop reads the losses of every slice of the step)."""
    masks, steps = fit(problem, mask_tol=2e-3, mask_window=5, micro_batch=2, return_steps=True)
    logits_fn, images, q = problem
    for i, s in enumerate(steps.tolist()):
        alone = optimise_masks(logits_fn, images, q, mask_size=8, mask_steps=s, micro_batch=2)
        assert torch.equal(masks[i], alone[i]), (i, s)


def test_config_keys_mask_tol_and_mask_window():
    assert Config().mask_tol == 0.0 and Config().mask_window == 10
    assert from_dict({"mask_tol": 0}).mask_tol == 0.0 and from_dict({"mask_tol": 1e-4, "mask_window": 5}).mask_window == 5
    for bad in ({"mask_tol": -1e-3}, {"mask_tol": float("inf")}, {"mask_window": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            from_dict(bad)
    with pytest.raises(ConfigError, match="must be int"):
        from_dict({"mask_window": 2.5})
    assert {"mask_tol", "mask_window"} <= set(Config.RESULT_KEYS)


def test_a_run_made_before_the_keys_existed_resumes_and_a_changed_tolerance_is_refused(tmp_path, image_folder,
                                                                                      tiny_checkpoint):
    from cigma_ray.pipeline import Job, Pipeline
    from cigma_ray.rundir import RunMismatch

    cfg = Config(tp_ratio=0.3, mask_steps=3, mask_batch=4, unit_images=4, bootstrap=0, top_k=2, batch_size=8)
    pipeline = finished_run(tmp_path / "run", image_folder, tiny_checkpoint, cfg)
    meta_path = tmp_path / "run" / "run.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["mask_tol"], meta["config"]["mask_window"]  # as an older version wrote it
    meta_path.write_text(json.dumps(meta))
    Pipeline(pipeline.job, progress=False)  # compatible: the old run used the defaults
    with pytest.raises(RunMismatch, match="mask_tol: run has 0.0, this command 0.001"):
        Pipeline(Job(model=pipeline.job.model, data=pipeline.job.data, out=pipeline.job.out,
                     config=cfg.replace(mask_tol=1e-3)), progress=False)
