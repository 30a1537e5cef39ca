"""The in-process pipeline: rankings equal the plain definition, resume, unit sizes, bad input."""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cigma_ray.config import Config, ConfigError
from cigma_ray.data import DataError, open_source
from cigma_ray.engine.reference import scan_by_weight_zeroing, zeroed_head
from cigma_ray.method import counterfactuals, head_scores, js, probs
from cigma_ray.models import ModelSpec
from cigma_ray.models.timm_generic import find_attentions
from cigma_ray.pipeline import Job, Pipeline, RunMismatch, Worker, run_status, select_images
from cigma_ray.storage import RunDir

from helpers import write_folder

FAST = Config(tp_ratio=0.8, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=200, top_k=3, batch_size=8)


def job(tmp_path, folder, checkpoint, name="run", cfg=FAST, **kw) -> Job:
    path, model, kwargs = checkpoint
    spec = ModelSpec(f"timm:{model}", checkpoint=path, model_kwargs=kwargs)
    return Job(model=spec, data=folder, out=str(tmp_path / name), config=cfg, **kw)


def rankings(run_dir) -> pa.Table:
    return pq.read_table(os.path.join(run_dir, "rankings.parquet"))


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


def test_parquet_source_with_string_and_integer_labels(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(0)
    blobs, names = [], []
    for i in range(30):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
        names.append(["cat", "dog", "eel"][i % 3])
    blobs[4] = b"broken"
    pq.write_table(pa.table({"image": blobs, "label": names}), tmp_path / "words.parquet")
    src = open_source(str(tmp_path / "words.parquet"))
    assert src.classes == ["cat", "dog", "eel"] and [r.label for r in src.records][:4] == [0, 1, 2, 0]
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "label": [i % 3 for i in range(30)]}),
                   tmp_path / "ints.parquet")
    p = Pipeline(job(tmp_path, str(tmp_path / "ints.parquet"), tiny_checkpoint), progress=False)
    p.run_all()
    failures = RunDir(p.job.out).read_folder("failures")
    assert failures["path"].to_pylist() == [f"{tmp_path / 'ints.parquet'}#4"]
    assert rankings(p.job.out).num_rows == len(p.adapter.heads)


def test_bad_data_is_named(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_source(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="must be a .parquet"):
        open_source(str(tmp_path / "table.csv"))
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match="image column"):
        open_source(str(tmp_path / "cols.parquet"))
    four = write_folder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=1)
    with pytest.raises(DataError, match="has 4 classes but .* outputs 3"):
        Pipeline(job(tmp_path, four, tiny_checkpoint), progress=False)
    numbered = write_folder(tmp_path / "numbered", classes=("0", "2", "7"), per_class=1)
    with pytest.raises(DataError, match="class index 7"):
        Pipeline(job(tmp_path, numbered, tiny_checkpoint), progress=False)
    assert not (tmp_path / "run").exists()  # nothing written before the checks


def test_top_k_larger_than_the_model_is_refused_early(tmp_path, image_folder, tiny_checkpoint):
    with pytest.raises(ConfigError, match="top_k=10: the model has 9 heads"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, cfg=FAST.replace(top_k=10)), progress=False)
    assert not (tmp_path / "run").exists()


def test_numbered_class_folders_map_to_model_indices(tmp_path):
    src = open_source(write_folder(tmp_path / "n", classes=("10", "2"), per_class=2))
    assert src.classes == ["2", "10"] and sorted({r.label for r in src.records}) == [2, 10]


def test_no_correct_image_is_a_clear_error(tmp_path, tiny_checkpoint):
    one = write_folder(tmp_path / "one", classes=("a", "b", "c"), per_class=1, size=32)
    p = Pipeline(job(tmp_path, one, tiny_checkpoint), progress=False)
    p.run_stage("predict", p.predict_units(), lambda u: 1, "img")
    preds = RunDir(p.job.out).read_folder("predictions")
    if preds["correct"].to_numpy().any():
        pytest.skip("the random model happened to classify an image correctly")
    with pytest.raises(DataError, match="classified correctly"):
        p.selected()


@pytest.mark.parametrize("values, message", [
    ({"tp_ratio": 0.0}, "tp_ratio"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"mask_steps": "many"}, "mask_steps"),
    ({"top_k": True}, "top_k"),
    ({"maks_steps": 3}, "unknown key"),
])
def test_bad_config_is_named(tmp_path, values, message):
    import yaml

    from cigma_ray import config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_config_file_errors(tmp_path):
    from cigma_ray import config

    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "ok.yaml").write_text("mask_lr: 1\nseed: 3\n")
    cfg = config.load(tmp_path / "ok.yaml")
    assert cfg.mask_lr == 1.0 and isinstance(cfg.mask_lr, float) and cfg.seed == 3


def test_rank_refuses_deltas_that_miss_or_repeat_cells(tmp_path, image_folder, tiny_checkpoint):
    j = job(tmp_path, image_folder, tiny_checkpoint)
    Pipeline(j, progress=False).run_all()
    run = RunDir(j.out)
    first, second = run.list("deltas")[:2]
    run.write_table(f"deltas/{second}", run.read_table(f"deltas/{first}"))  # first's cells twice, second's none
    with pytest.raises(RuntimeError, match=r"cells missing or repeated\): remove the run's deltas/ folder"):
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
    status = run_status(run)["stages"]
    shards = -(-masks.num_rows // FAST.unit_images)
    assert status["scan"] == status["scan round 1"] == status["scan round 2"] == (shards, shards)
    with pytest.raises(ConfigError, match="rounds=5 with k_per_round=3 would remove 12 of the 9 heads"):
        Pipeline(job(tmp_path, image_folder, tiny_checkpoint, name="too-many", cfg=FAST.replace(rounds=5, k_per_round=3)))
