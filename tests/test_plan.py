"""`cigma-ray plan`: parameter formulas exact on tiny models, plausible on InternVL2-26B and LLaVA-1.5-13B."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from hf_configs import internvl2_26b as internvl2_26b_published  # noqa: E402
from hf_configs import internvl2_26b_hf as internvl2_26b  # noqa: E402
from hf_configs import llava15_13b  # noqa: E402

from cigma_ray.cli import main  # noqa: E402
from cigma_ray.config import Config  # noqa: E402
from cigma_ray.models.hf.sizes import count_params, read_config  # noqa: E402
from cigma_ray.plan import make_plan  # noqa: E402

from hf_tiny import SAVERS  # noqa: E402


@pytest.mark.parametrize("kind", list(SAVERS))
def test_parameter_formulas_are_exact_on_models_built_from_the_config(tmp_path, kind):
    import transformers

    from cigma_ray.models.hf.vlm import ARCHITECTURES

    path = SAVERS[kind](str(tmp_path / kind))
    cls = transformers.CLIPModel if kind == "clip" else getattr(transformers, ARCHITECTURES[kind].model_class)
    model = cls.from_pretrained(path)
    counted = count_params(read_config(path))
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted["vision"] == sum(p.numel() for p in (model.vision_model if kind == "clip"
                                                          else model.model.vision_tower).parameters())


def test_internvl2_26b_plan_is_plausible(tmp_path):
    config = read_config(internvl2_26b(str(tmp_path / "internvl2-26b")))
    p = make_plan(config, precision="bf16", gpu="h100", images=10_000)
    assert p["params"]["total"] == pytest.approx(25.5e9, rel=0.02)
    assert p["params"]["vision"] == pytest.approx(5.5e9, rel=0.03)  # InternViT-6B
    assert 51 < p["memory_gb"] < 80 and p["gpus_per_replica"] == 1 and p["replicas_per_node"] == 8
    assert p["heads"] == 45 * 25 and p["images_in_d"] == 4000
    assert p["forwards"]["scan"] == 45 * 25 * 4000 * 3  # measure_fig (the default): three views per pair
    assert make_plan(config, measure_fig=False)["forwards"]["scan"] == 45 * 25 * 4000 * 2
    on_a100 = make_plan(config, precision="bf16", gpu="a100-40")
    assert on_a100["gpus_per_replica"] == 2 and on_a100["replicas_per_node"] == 4
    assert make_plan(config, precision="fp32", gpu="h100")["gpus_per_replica"] == 2
    text = make_plan(config, heads="vision+text", rate=10.0)
    assert text["heads"] == 45 * 25 + 48 * 48 and text["rate_measured"]


def test_llava15_13b_plan_is_plausible(tmp_path):
    p = make_plan(read_config(llava15_13b(str(tmp_path / "llava"))), precision="bf16", gpu="a100-40")
    assert p["params"]["total"] == pytest.approx(13.35e9, rel=0.02)
    assert p["params"]["projector"] == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert 26.7 < p["memory_gb"] < 40 and p["gpus_per_replica"] == 1
    assert p["heads"] == 23 * 16 and p["unread_layers"] == 1  # it reads layer 23's output (-2): layer 24 is skipped


def test_plan_command_prints_every_number(tmp_path, capsys):
    path = internvl2_26b(str(tmp_path / "m"))
    assert main(["plan", "--model", f"hf:{path}", "--gpu", "a100-40", "--images", "1000", "--rate", "8"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters 25.5", "per replica in bf16 on 2 x a100-40", "--gpus-per-replica 2", "4 replicas per 8-GPU node",
                 "D = 400", "1125 scanned", "language model runs in full", "(measured, --rate)", "GPU-hours"):
        assert word in out, (word, out)
    assert "heads x D x 3, measure_fig" in out  # the default config measures FIG^(-h), not SWAP^(-h)
    (tmp_path / "paper.yaml").write_text("measure_fig: false\nmeasure_swap: false\ntp_ratio: 0.5\n")
    assert main(["plan", "--model", f"hf:{path}", "--images", "1000", "--config", str(tmp_path / "paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "D = 500" in out and "scan 1,125,000 (heads x D x 2)" in out
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_plan_on_the_published_configs_counts_within_1_percent_and_prints_a_memory_table(tmp_path, capsys, monkeypatch):
    """InternVL2-26B's config.json as published (internvl_chat, with an auto_map to code that is not there) and
    LLaVA-1.5-13B's: read without running code and without a prompt; parameters within 1% of the published
    25.5 B and 13.35 B; a memory row per stage, the micro-batches, host memory per replica."""
    import builtins
    import re

    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("plan prompted"))
    for path, published in ((internvl2_26b_published(str(tmp_path / "ivl")), 25.5e9),
                            (llava15_13b(str(tmp_path / "llava")), 13.35e9)):
        assert main(["plan", "--model", f"hf:{path}"]) == 0
        out = capsys.readouterr().out
        total = float(re.search(r"^parameters ([\d.]+) B", out, re.M)[1]) * 1e9
        assert abs(total / published - 1) < 0.01, out
        for row in ("weights ", "mask stage ", "scan ", "class scoring ", "peak "):
            assert re.search(rf"^  {row}", out, re.M), (row, out)
        assert re.search(r"^host +[\d.]+ GB per replica", out, re.M), out
        assert "put `mask_micro_batch: " in out  # 64 images at once do not fit beside 13-26 B of weights


def test_memory_table_follows_the_estimates_and_the_config(tmp_path):
    """The replica's GPUs, its micro-batches and bytes per stage come from engine.memory's estimates: the
    fewest GPUs holding the weights and one image of the mask stage (or the config's mask_micro_batch)."""
    from cigma_ray.engine.memory import HOST_PROCESS, estimate_memory, micro_batches

    config = read_config(internvl2_26b_published(str(tmp_path / "ivl")))
    p = make_plan(config)
    m, est = p["memory"], estimate_memory(config, params=p["params"]["total"])
    fit = micro_batches(est, 80 * 10**9)
    assert m["gpus"] == 1 and m["fit"] == fit and 1 <= fit["mask"] < 64
    assert m["mask_micro_batch"] == m["mask_suggested"] == fit["mask"] and not m["mask_whole_batch"]
    assert m["scan_batch"] == 64 <= fit["scan"]  # batch_size: all that fit, at most the config's
    assert m["on_device"] == {"weights": est.weights, "mask": fit["mask"] * est.mask_per_image,
                              "scan": 64 * est.scan_per_forward}
    assert m["host"] == HOST_PROCESS + est.host_loading and m["host"] < 0.2 * est.weights  # no host copy of the weights
    assert p["memory_gb"] * 1e9 == pytest.approx(est.weights + fit["mask"] * est.mask_per_image)

    set_by_config = make_plan(config, mask_micro_batch=2, batch_size=16)["memory"]
    assert set_by_config["mask_micro_batch"] == 2 and set_by_config["mask_suggested"] is None
    assert set_by_config["scan_batch"] == 16
    more = make_plan(config, mask_micro_batch=fit["mask"] + 1)["memory"]  # does not fit beside the weights on one
    assert more["gpus"] == 2 and more["mask_micro_batch"] == fit["mask"] + 1
    whole = make_plan(config, gpu="h200", mask_batch=4)["memory"]
    assert whole["mask_whole_batch"] and whole["mask_micro_batch"] == 4 and whole["mask_suggested"] is None
    with pytest.raises(ValueError, match="more than the 1 a10g GPU"):
        make_plan(config, gpu="a10g", gpus_per_node=1)
def test_plan_adaptive_estimates_the_forwards_and_says_how(tmp_path, capsys):
    from cigma_ray.method.adaptive import REFERENCE_SAVINGS, expected_saving

    path = internvl2_26b(str(tmp_path / "m"))
    config = read_config(f"hf:{path}")
    exhaustive = make_plan(config, images=10_000)
    p = make_plan(config, images=10_000, adaptive=True)
    d = exhaustive["images_in_d"]
    assert p["scan_exhaustive"] == exhaustive["forwards"]["scan"] == 1125 * d * 3
    assert p["adaptive_saving"] == expected_saving(d) and 1 < p["adaptive_saving"] < 5
    assert p["forwards"]["scan"] == math.ceil(p["scan_exhaustive"] / p["adaptive_saving"]) and p["hours"] < exhaustive["hours"]
    for order, points in REFERENCE_SAVINGS.items():  # the reference replays are reproduced where they were measured
        for n, saving in points:
            assert expected_saving(n, order) == pytest.approx(saving)
    assert expected_saving(100) == 1.0 and expected_saving(32416, "screen") > expected_saving(32416)
    screen = make_plan(config, images=10_000, adaptive=True, adaptive_order="screen")
    assert screen["forwards"]["screen"] == 3 * 3 * d and screen["forwards"]["scan"] <= p["forwards"]["scan"]
    assert make_plan(config, images=10_000, adaptive=True, adaptive_saving=8.0)["forwards"]["scan"] == \
        math.ceil(p["scan_exhaustive"] / 8)

    assert main(["plan", "--model", f"hf:{path}", "--images", "10000", "--adaptive"]) == 0
    out = capsys.readouterr().out
    said = make_plan(config, images=10_000, adaptive=True, measure_swap=Config().measure_swap)  # the config's views
    assert f"exhaustive: {said['scan_exhaustive']:,}" in out and f"scan about {said['forwards']['scan']:,} adaptive" in out
    assert "bench adaptive RUN" in out and "how BIG spreads over D" in out
    assert main(["plan", "--model", f"hf:{path}", "--adaptive", "--saving", "6"]) == 0
    assert "--saving 6, as measured" in capsys.readouterr().out
    assert main(["plan", "--model", f"hf:{path}", "--saving", "6"]) == 2
    assert "add --adaptive" in capsys.readouterr().err
