"""`cigma-ray export` of a mean-ablation run (each removed head's mean output folded into the output projection's
bias) loads in plain timm and equals the scan's ablation, the smaller model too; Hugging Face runs export a
state dict of their transformers class (CLIP with mean ablation, LLaVA's vision and language heads with zero
ablation) that equals the scan's ablation."""
from __future__ import annotations

import json

import pytest
import torch

from cigma_ray.cli import main
from cigma_ray.config import Config
from cigma_ray.engine import Replica
from cigma_ray.models import ModelSpec
from cigma_ray.models.surgery import load_smaller
from cigma_ray.pipeline import Job, Pipeline
from cigma_ray.rundir import open_run

from helpers import write_folder

FAST = Config(tp_ratio=0.8, mask_steps=3, mask_batch=4, unit_images=4, bootstrap=20, top_k=3, batch_size=8,
              ablation="mean")


def masked_logits(run: str, x: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """The scan's own ablation of the run (mean substitutes installed when the run has them)."""
    replica = Replica(open_run(run).load_model())
    return replica.logits(x, replica.keep_without(heads))


def test_mean_ablation_export_loads_in_plain_timm(tmp_path, image_folder, tiny_checkpoint):
    path, name, kwargs = tiny_checkpoint
    job = Job(model=ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs), data=image_folder,
              out=str(tmp_path / "run"), config=FAST)
    Pipeline(job, progress=False).run_all()
    out, small_path = str(tmp_path / "pruned.safetensors"), str(tmp_path / "small.pt")
    assert main(["export", job.out, "--heads", "0.0,0.1,0.2,2.1", "--out", out, "--smaller", small_path]) == 0
    info = json.load(open(out + ".json"))
    assert info["ablation"] == "mean"
    scope: dict = {}
    exec(info["load"], scope)  # plain timm
    x = torch.randn(3, 3, 32, 32)
    heads = [(0, 0), (0, 1), (0, 2), (2, 1)]
    want = masked_logits(job.out, x, heads)
    zero = Replica(open_run(job.out).load_model())
    zero.adapter.gates.set_means(None)
    assert (zero.logits(x, zero.keep_without(heads)) - want).abs().max() > 1e-3  # the means matter here
    with torch.inference_mode():
        torch.testing.assert_close(scope["model"](x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_smaller(small_path)(x), want, rtol=0, atol=1e-5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind, heads, ablation", [("clip", "vision", "mean"), ("llava", "vision+text", "zero")])
def test_hugging_face_export_equals_the_scans_ablation(tmp_path, kind, heads, ablation, capsys):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from cigma_ray.models.hf.plain import load_into

    from hf_tiny import SAVERS

    model_dir = SAVERS[kind](str(tmp_path / kind))
    data = write_folder(tmp_path / "images", classes=("cat", "dog", "bus"), per_class=3)
    cfg = FAST.replace(ablation=ablation, tp_ratio=1.0, score="big_drop")
    job = Job(model=ModelSpec(f"hf:{model_dir}", heads=heads), data=data, out=str(tmp_path / "run"), config=cfg)
    Pipeline(job, progress=False).run_all()
    removed = "0.1,1.0" if heads == "vision" else "0.1,2.0,3.3"
    out = str(tmp_path / "pruned.safetensors")
    assert main(["export", job.out, "--heads", removed, "--out", out]) == 0
    assert "transformers" in capsys.readouterr().out
    info = json.load(open(out + ".json"))
    assert info["model"] == ("CLIPModel" if kind == "clip" else "LlavaForConditionalGeneration")
    scope: dict = {}
    exec(info["load"], scope)  # plain transformers: the class, the directory, the state dict
    from safetensors.torch import load_file

    state = load_file(out)
    loaded = open_run(job.out).load_model()
    x = torch.randn(2, 3, *loaded.adapter.input_size)
    heads_removed = [tuple(int(v) for v in h.split(".")) for h in removed.split(",")]
    want = masked_logits(job.out, x, heads_removed)
    loaded.adapter.gates.set_means(None)
    load_into(loaded, state, "vision_model." if kind == "clip" else "")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.adapter.logits(x), want, rtol=0, atol=1e-5)
    assert info["check"]["max_abs_logit_diff_vs_keep_mask"] < 1e-5
    assert main(["export", job.out, "--heads", removed, "--out", out, "--smaller", str(tmp_path / "s.pt")]) == 2
    assert "only timm VisionTransformers" in capsys.readouterr().err
