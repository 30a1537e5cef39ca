"""InternVL2 / InternVL2.5 in the published `internvl_chat` format, held to the published code.

The fixture (../shared/internvl_chat, made offline: the published code, MIT, and a tiny random
checkpoint in exactly the published format) is the oracle: its shimmed copy runs under
transformers 5 and gives the published forward. cigma-ray never runs that code itself; these tests
load it (trust_remote_code) only to compare, and skip where the folder or its `einops` is missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from cigma_ray.models import ModelError, ModelSpec, load  # noqa: E402

from helpers import INTERNVL2, INTERNVL2_5, INTERNVL2_PUBLISHED, needs_internvl_chat  # noqa: E402

V2, V25, PUBLISHED = INTERNVL2, INTERNVL2_5, INTERNVL2_PUBLISHED
needs_fixture = needs_internvl_chat
CLASSES = ("red car", "red bus", "cat")  # two share their first token: whole answers are scored


@pytest.fixture(scope="module")
def oracle():
    """The published InternVLChatModel and its tokenizer, per checkpoint folder (loaded once)."""
    pytest.importorskip("einops", reason="the published InternVL code needs einops")
    from transformers import AutoModel, AutoTokenizer

    cache = {}

    def get(path: str):
        if path not in cache:
            model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
            model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
            cache[path] = model, tok
        return cache[path]
    return get


def published_query(model, question: str, tiles: int) -> str:
    """The prompt exactly as InternVLChatModel.chat() builds it, with the published conversation module."""
    template = sys.modules[type(model).__module__].get_conv_template(model.template)
    template.system_message = model.system_message
    template.append_message(template.roles[0], "<image>\n" + question)
    template.append_message(template.roles[1], None)
    return template.get_prompt().replace("<image>", "<img>" + "<IMG_CONTEXT>" * model.num_image_token * tiles + "</img>", 1)


def published_class_logprobs(model, tok, prefix_ids, x, names) -> torch.Tensor:
    """log p(class tokens | image, prompt): the published forward over prompt + answer, one per (image, class)."""
    out = torch.empty(len(x), len(names))
    for c, name in enumerate(names):
        ids = torch.tensor(tok(name, add_special_tokens=False)["input_ids"])
        full = torch.cat([prefix_ids[0], ids])[None]
        for i in range(len(x)):
            logits = model(pixel_values=x[i: i + 1], input_ids=full, attention_mask=torch.ones_like(full),
                           image_flags=torch.ones(1, 1, dtype=torch.long)).logits[0].float().log_softmax(-1)
            t = prefix_ids.shape[1]
            out[i, c] = sum(logits[t - 1 + j, ids[j]] for j in range(len(ids)))
    return out


@contextlib.contextmanager
def zeroed_columns(proj: torch.nn.Linear, head: int, dim: int):
    """The definition of ablating a head: its columns of the output projection are zero."""
    saved = proj.weight.detach().clone()
    with torch.no_grad():
        proj.weight[:, head * dim: (head + 1) * dim] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)


@needs_fixture
@pytest.mark.parametrize("path", [V2, V25], ids=["internvl2", "internvl2_5"])
def test_class_logits_equal_the_published_forward_and_its_head_ablations(oracle, path):
    """Prompt tokens as chat() builds them; class log-likelihoods equal the published model's; and a
    keep-mask on a vision or a language-model head equals zeroing that head's columns of the published
    model's own output projection (`attn.proj`, InternLM2's `wo`): the head numbering carries over."""
    model, tok = oracle(path)
    lm = load(ModelSpec(f"hf:{path}", classes=CLASSES, heads="vision+text", prompts=("What is it: {classes}?",)))
    a = lm.adapter
    want_ids = tok(published_query(model, "What is it: red car, red bus, cat?", tiles=1), return_tensors="pt")["input_ids"]
    assert torch.equal(a.model.prefix_ids.cpu(), want_ids)
    assert int((want_ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).sum()) == model.num_image_token == 4
    assert a.heads_per_layer == [4, 4, 4, 4] and a.layer_labels == ["vision.0", "vision.1", "text.0", "text.1"]
    assert a.skipped_layers == {}  # select_layer -1: every vision layer is read

    x = torch.randn(2, 3, *a.input_size, generator=torch.Generator().manual_seed(0))
    vision_proj = [layer.attn.proj for layer in model.vision_model.encoder.layers]
    text_proj = [layer.attention.wo for layer in model.language_model.model.layers]
    with torch.inference_mode():
        ours = a.logits(x)
        torch.testing.assert_close(ours, published_class_logprobs(model, tok, want_ids, x, CLASSES), rtol=0, atol=2e-5)
        for layer, head, proj in [(0, 1, vision_proj[0]), (1, 3, vision_proj[1]), (2, 2, text_proj[0]), (3, 0, text_proj[1])]:
            keep = torch.ones(2, 4)
            keep[:, head] = 0
            with zeroed_columns(proj, head, 8):
                want = published_class_logprobs(model, tok, want_ids, x, CLASSES)
            got = a.logits(x, {layer: keep})
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
            assert (got - ours).abs().max() > 1e-4  # the head matters: the comparison can fail


@needs_fixture
def test_unmodified_published_checkpoint_loads_the_same_without_its_code():
    """The folder with the code as published (which would give NaN under transformers 5) loads identically:
    no file of it is imported."""
    before = set(sys.modules)
    a = load(ModelSpec(f"hf:{PUBLISHED}", classes=CLASSES)).adapter
    b = load(ModelSpec(f"hf:{V2}", classes=CLASSES)).adapter
    assert not [m for m in set(sys.modules) - before if "internvl_chat" in m or "modeling_intern" in m]
    x = torch.randn(2, 3, *a.input_size)
    with torch.inference_mode():
        la, lb = a.logits(x), b.logits(x)
    assert torch.isfinite(la).all() and torch.equal(la, lb)


@needs_fixture
def test_a_later_vision_layer_than_the_read_one_is_skipped_and_the_rest_still_match(oracle, tmp_path):
    """select_layer -2 (as LLaVA reads): the last vision layer's heads cannot reach the logits and are skipped."""
    path = tmp_path / "sel2"
    shutil.copytree(V2, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "select_layer": -2}))
    model, tok = oracle(str(path))
    a = load(ModelSpec(f"hf:{path}", classes=CLASSES)).adapter
    assert list(a.skipped_layers) == [1] and "vision_feature_layer -2" in a.skipped_layers[1]
    assert a.scanned_heads == [(0, h) for h in range(4)]
    x = torch.randn(2, 3, *a.input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(a.logits(x), published_class_logprobs(model, tok, a.model.prefix_ids.cpu(), x, CLASSES),
                                   rtol=0, atol=2e-5)
        torch.testing.assert_close(a.logits(x, {1: torch.zeros(2, 4)}), a.logits(x), rtol=0, atol=0)


@needs_fixture
def test_the_ray_driver_describes_it_without_weights():
    spec = ModelSpec(f"hf:{V25}", classes=CLASSES, heads="vision+text")
    meta, cpu = load(spec, "meta"), load(spec, "cpu")
    assert all(p.device.type == "meta" for p in meta.adapter.model.parameters())
    assert meta.fingerprint == cpu.fingerprint and meta.adapter.heads_per_layer == cpu.adapter.heads_per_layer
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in cpu.adapter.model.parameters())
    assert cpu.fingerprint["architecture"] == "internvl_chat"


@needs_fixture
@pytest.mark.parametrize("change, message", [
    ({"ps_version": "v1"}, "ps_version"),
    ({"template": "vicuna_v1.1"}, "template 'vicuna_v1.1'"),
    ({"use_llm_lora": 16}, "LoRA"),
    ({"llm_config": {"architectures": ["Phi3ForCausalLM"]}}, "Phi3ForCausalLM"),
])
def test_what_cannot_be_mapped_exactly_is_refused_by_name(tmp_path, change, message):
    path = tmp_path / "bad"
    shutil.copytree(V2, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError, match=message):
        load(ModelSpec(f"hf:{path}", classes=CLASSES))


@needs_fixture
def test_a_checkpoint_without_tokenizer_json_says_how_to_make_one(tmp_path):
    path = tmp_path / "notok"
    shutil.copytree(V2, path)
    os.remove(path / "tokenizer.json")
    with pytest.raises(ModelError, match="no tokenizer.json.*save_pretrained"):
        load(ModelSpec(f"hf:{path}", classes=CLASSES))


@needs_fixture
@pytest.mark.timeout(600)
def test_scan_in_process_and_on_a_local_ray_cluster_agree(tmp_path):
    """A whole scan of the published-format checkpoint (vision+text heads): in this process, and by the CLI
    on a local Ray cluster with two replicas; the same heads ranked with the same scores."""
    import yaml

    from cigma_ray.config import Config
    from cigma_ray.pipeline import Job, Pipeline

    from helpers import write_folder
    from ray_cluster import ray_env

    data = write_folder(tmp_path / "images", classes=("cat", "red bus", "red car"), per_class=2, size=56)
    cfg = Config(tp_ratio=1.0, mask_steps=2, mask_batch=3, unit_images=3, bootstrap=10, top_k=3, batch_size=8)
    local = Pipeline(Job(model=ModelSpec(f"hf:{V2}", heads="vision+text"), data=data, out=str(tmp_path / "local"),
                         config=cfg), progress=False)
    local.run_all()
    want = pq.read_table(str(tmp_path / "local" / "rankings.parquet"))
    assert want.num_rows == 16 and np.isfinite(want["score"].to_numpy()).all()

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = str(tmp_path / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="cgr", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, "-m", "cigma_ray.cli", "scan", "--model", f"hf:{V2}", "--heads", "vision+text",
                               "--data", data, "--out", out, "--config", str(tmp_path / "c.yaml"), "--address", "local",
                               "--replicas", "2", "--quiet"], env=ray_env(RAY_TMPDIR=ray_tmp), capture_output=True,
                              text=True, timeout=500)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = pq.read_table(os.path.join(out, "rankings.parquet"))
    got, want = (t.sort_by([("layer", "ascending"), ("head", "ascending")]) for t in (got, want))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-6)
    meta = json.load(open(os.path.join(out, "run.json")))
    assert meta["model"]["layer_labels"] == ["vision.0", "vision.1", "text.0", "text.1"]
    assert meta["model"]["skipped_layers"] == {}
