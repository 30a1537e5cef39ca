"""`cigma-ray plan`: parameter formulas exact on tiny models, plausible on InternVL2-26B and LLaVA-1.5-13B."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from cigma_ray.cli import main  # noqa: E402
from cigma_ray.models.hf.sizes import count_params, read_config  # noqa: E402
from cigma_ray.plan import make_plan  # noqa: E402

from hf_tiny import SAVERS  # noqa: E402


def internvl2_26b(path: str) -> str:
    """InternVL2-26B's public hyper-parameters in transformers' InternVL format: InternViT-6B-448px
    (45 layers, 3200 wide, 25 heads, MLP 12800, patch 14, q/k RMS norms) and InternLM2-20B written
    as a Llama (48 layers, 6144 wide, 48 heads, 8 KV heads, MLP 16384, vocabulary 92553)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    InternVLConfig(vision_config=InternVLVisionConfig(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                                                      intermediate_size=12800, image_size=448, patch_size=14,
                                                      use_qk_norm=True, norm_type="rms_norm"),
                   text_config=LlamaConfig(hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                                           num_key_value_heads=8, intermediate_size=16384, vocab_size=92553,
                                           tie_word_embeddings=False),
                   downsample_ratio=0.5, image_seq_length=256, tie_word_embeddings=False).save_pretrained(path)
    return path


def llava15_13b(path: str) -> str:
    """LLaVA-1.5-13B: CLIP ViT-L/14 at 336 px, Vicuna-13B, a two-layer MLP projector 1024 -> 5120 -> 5120."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096, image_size=336, patch_size=14),
                text_config=LlamaConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                                        tie_word_embeddings=False),
                vision_feature_layer=-2, vision_feature_select_strategy="default").save_pretrained(path)
    return path


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
    assert p["heads"] == 24 * 16


def test_plan_command_prints_every_number(tmp_path, capsys):
    path = internvl2_26b(str(tmp_path / "m"))
    assert main(["plan", "--model", f"hf:{path}", "--gpu", "a100-40", "--images", "1000", "--rate", "8"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters 25.5", "GB per replica in bf16", "--gpus-per-replica 2", "4 replicas per 8-GPU node",
                 "D = 400", "1125 scanned", "language model runs in full", "(measured, --rate)", "GPU-hours"):
        assert word in out, (word, out)
    assert "heads x D x 4, measure_fig, measure_swap" in out  # the default config measures FIG^(-h) and SWAP^(-h)
    (tmp_path / "paper.yaml").write_text("measure_fig: false\nmeasure_swap: false\ntp_ratio: 0.5\n")
    assert main(["plan", "--model", f"hf:{path}", "--images", "1000", "--config", str(tmp_path / "paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "D = 500" in out and "scan 1,125,000 (heads x D x 2)" in out
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err
