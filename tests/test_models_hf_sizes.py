"""Configs read without running code, parameter counts from hyper-parameters, and the weight reader."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from hf_configs import INTERNVL2_26B, llava15_13b_config  # noqa: E402

from cigma_ray.models import ModelError  # noqa: E402
from cigma_ray.models.hf.internvl_chat import native_config, with_defaults  # noqa: E402
from cigma_ray.models.hf.sizes import count_params, internvl_chat_params, read_config  # noqa: E402

from helpers import INTERNVL2 as V2  # noqa: E402
from helpers import needs_internvl_chat as needs_fixture  # noqa: E402


def meta_count(config) -> int:
    import transformers

    from cigma_ray.models.hf.vlm import ARCHITECTURES

    with torch.device("meta"):
        model = getattr(transformers, ARCHITECTURES[config.model_type].model_class)._from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_internvl2_26b_counts_25_5_billion_and_maps_to_a_model_of_that_size():
    counts = internvl_chat_params(INTERNVL2_26B)
    assert abs(counts["total"] / 25.5e9 - 1) < 0.01 and abs(counts["vision"] / 5.5e9 - 1) < 0.01, counts
    native = native_config(with_defaults(INTERNVL2_26B))
    assert count_params(native) == counts  # plan's formula on the mapped config
    assert meta_count(native) == counts["total"]  # and the model transformers builds from it


def test_llava_15_13b_counts_13_35_billion():
    config = llava15_13b_config()
    total = count_params(config)["total"]
    assert abs(total / 13.35e9 - 1) < 0.01, total
    assert meta_count(config) == total


@needs_fixture
def test_published_tiny_config_counts_equal_the_published_and_the_mapped_models(tmp_path):
    pytest.importorskip("einops", reason="the published InternVL code needs einops")
    from transformers import AutoModel

    raw = json.load(open(os.path.join(V2, "config.json")))
    counts = internvl_chat_params(raw)
    published = AutoModel.from_pretrained(V2, trust_remote_code=True, dtype=torch.float32)
    assert counts["total"] == sum(p.numel() for p in published.parameters()) == 68_672
    assert counts["vision"] == sum(p.numel() for p in published.vision_model.parameters())
    assert counts["language"] == sum(p.numel() for p in published.language_model.parameters())
    assert meta_count(native_config(with_defaults(raw))) == counts["total"]
    qwen = {**raw, "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "vocab_size": 128}}
    assert internvl_chat_params(qwen)["total"] == meta_count(native_config(with_defaults(qwen)))


@needs_fixture
def test_reading_an_internvl_chat_config_runs_no_code_and_never_prompts(monkeypatch):
    import builtins
    import sys

    def no_input(*args):
        raise AssertionError("prompted")
    monkeypatch.setattr(builtins, "input", no_input)
    before = set(sys.modules)
    config = read_config(os.path.join(V2, "config.json"))
    assert config.model_type == "internvl" and config.image_seq_length == 4 and config.vision_config.use_qk_norm
    assert config.text_config.model_type == "llama" and config.text_config.num_key_value_heads == 2
    assert not [m for m in set(sys.modules) - before if "modeling_intern" in m or "configuration_intern" in m]
    from cigma_ray.plan import make_plan

    plan = make_plan(read_config(f"hf:{V2}"), classes=3, heads="vision+text")
    assert plan["params"]["total"] == 68_672 and plan["heads"] == 16


def test_an_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoConfig": "a.B"}}))
    with pytest.raises(ModelError, match="model_type 'mystery'.*never runs"):
        read_config(str(tmp_path))


def test_the_model_type_is_checked_before_any_weights_are_copied(tmp_path, monkeypatch):
    """The copy route of an object-storage URL (here file://, which fsspec copies like s3://; the S3 case is in
    test_models_hf_s3.py) reads config.json first and refuses an unknown model type before copying weights."""
    from cigma_ray.models.hf.common import copy_to_cache
    from cigma_ray.models.hf.loader import check_model_type

    src = tmp_path / "bucket" / "model"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (src / "model.safetensors").write_bytes(b"\0" * 1024)
    monkeypatch.setenv("CIGMA_RAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="model_type 'qwen2_vl'"):
        copy_to_cache(f"file://{src}", lambda config: check_model_type(config.get("model_type", ""), "hf:x"))
    copied = [f for _, _, files in os.walk(tmp_path / "cache") for f in files] if (tmp_path / "cache").exists() else []
    assert "model.safetensors" not in copied and "config.json" not in copied


def test_the_weight_reader_gives_what_safetensors_gives(tmp_path):
    """Shards with an index, several dtypes, a scalar and an empty tensor, read without memory maps."""
    from safetensors.torch import load_file, save_file

    from cigma_ray.models.hf.weights import checkpoint_entries, read_tensors

    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(5, 7, generator=g), "x.bias": torch.randn(7, generator=g).to(torch.bfloat16)}
    b = {"y": torch.arange(6, dtype=torch.int64).reshape(2, 3), "s": torch.tensor(3.5, dtype=torch.float16),
         "e": torch.empty(0, 4), "m": torch.tensor([True, False])}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = {name: t.clone() for name, t in read_tensors(checkpoint_entries(str(tmp_path)))}
    want = {**load_file(str(tmp_path / "model-00001-of-00002.safetensors")),
            **load_file(str(tmp_path / "model-00002-of-00002.safetensors"))}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    os.remove(tmp_path / "model.safetensors.index.json")
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        os.remove(tmp_path / f)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="no \\*.safetensors.*safe_serialization"):
        checkpoint_entries(str(tmp_path))
