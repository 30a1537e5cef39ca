"""Hugging Face adapters on tiny random models: keep-mask = weight zeroing, class scoring = brute force."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from cigma_ray.models import ModelError, ModelSpec, load  # noqa: E402
from cigma_ray.models.hf.common import device_plan  # noqa: E402

from hf_tiny import SAVERS  # noqa: E402

CLASSES = ("red car", "red bus", "cat")  # two share their first token: the sequence path is exercised


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: save(str(root / kind)) for kind, save in SAVERS.items()}


@contextlib.contextmanager
def zeroed_columns(proj: torch.nn.Linear, head: int, dim: int):
    """The definition: head h contributes nothing = its columns of the output projection are zero."""
    saved = proj.weight.detach().clone()
    with torch.no_grad():
        proj.weight[:, head * dim: (head + 1) * dim] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)


@pytest.mark.parametrize("kind, heads", [("clip", "vision"), ("llava", "vision+text"), ("llava_next", "vision+text"),
                                         ("internvl", "vision+text")])
def test_keep_mask_equals_zeroing_the_heads_output_projection_columns(saved, kind, heads):
    lm = load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES, heads=heads))
    a = lm.adapter
    x = torch.randn(3, 3, *a.input_size)
    with torch.inference_mode():
        intact = a.logits(x)
        for layer, head in [(0, 1), (a.num_layers - 1, a.heads_per_layer[-1] - 1)]:
            keep = torch.ones(3, a.heads_per_layer[layer])
            keep[1:, head] = 0  # image 0 keeps it: masks are per sample
            masked = a.logits(x, {layer: keep})
            proj = a.gates.projections[layer]
            with zeroed_columns(proj, head, a.gates.head_dims[layer]):
                zeroed = a.logits(x)
            torch.testing.assert_close(masked[1:], zeroed[1:], rtol=0, atol=1e-5)
            torch.testing.assert_close(masked[0], intact[0], rtol=0, atol=1e-5)
    assert a.layer_labels[0] == "vision.0" and a.layer_labels[-1] == ("text.1" if heads != "vision" else "vision.1")
    assert lm.fingerprint["layer_labels"] == a.layer_labels


def test_ablating_a_vision_head_changes_the_answer(saved):
    """LLaVA reads the second-to-last vision layer, so layer 0's heads matter (and the last one's cannot)."""
    a = load(ModelSpec(f"hf:{saved['llava']}", classes=CLASSES)).adapter
    x = torch.randn(2, 3, *a.input_size)
    with torch.inference_mode():
        keep = torch.zeros(2, a.heads_per_layer[0])
        assert (a.logits(x, {0: keep}) - a.logits(x)).abs().max() > 1e-3


def brute_force(vlm, prefix_ids: torch.Tensor, pixels: dict, names: tuple[str, ...], tokenizer) -> torch.Tensor:
    """log p(class tokens | image, prompt), one whole forward per (image, class), no cache."""
    b = next(iter(pixels.values())).shape[0]
    out = torch.empty(b, len(names))
    for c, name in enumerate(names):
        ids = torch.tensor(tokenizer(name, add_special_tokens=False)["input_ids"])
        full = torch.cat([prefix_ids[0], ids])[None].expand(b, -1)
        logp = vlm(input_ids=full, **pixels).logits.float().log_softmax(-1)
        t = prefix_ids.shape[1]
        out[:, c] = sum(logp[:, t - 1 + j, ids[j]] for j in range(len(ids)))
    return out


@pytest.mark.parametrize("kind", ["llava", "llava_next", "internvl"])
def test_class_scores_equal_brute_force_log_likelihoods(saved, kind, monkeypatch):
    from transformers import AutoProcessor

    from cigma_ray.models.hf import vlm as hf_vlm

    monkeypatch.setattr(hf_vlm, "LOGIT_ROWS", 1)  # the vocabulary projection in slices of one answer token

    lm = load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES, heads="vision+text"))
    model = lm.adapter.model
    tokenizer = AutoProcessor.from_pretrained(saved[kind]).tokenizer
    x = torch.randn(2, 3, *lm.adapter.input_size)
    keep = {0: torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1]]), 3: torch.tensor([[1.0, 1, 1, 1], [0, 1, 1, 0]])}
    with torch.inference_mode():
        for k in ({}, keep):  # text heads ablated too: the class continuations see the same masks
            got = lm.adapter.logits(x, k)
            with lm.adapter.gates.use(k):
                want = brute_force(model.vlm, model.prefix_ids, model.arch.pixels(model.vlm, x), CLASSES, tokenizer)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_first_token_scoring_needs_distinct_first_tokens(saved):
    with pytest.raises(ModelError, match="start with its own token"):
        load(ModelSpec(f"hf:{saved['llava']}", classes=CLASSES, scoring="first"))
    lm = load(ModelSpec(f"hf:{saved['llava']}", classes=("car", "bus", "cat"), scoring="first"))
    seq = load(ModelSpec(f"hf:{saved['llava']}", classes=("car", "bus", "cat")))
    x = torch.randn(2, 3, *lm.adapter.input_size)
    with torch.inference_mode():  # one-token classes: both are the next-token log-probabilities
        torch.testing.assert_close(lm.adapter.logits(x), seq.adapter.logits(x), rtol=0, atol=1e-6)


def test_clip_zero_shot_and_its_prefix_path(saved):
    from transformers import CLIPModel, CLIPProcessor

    names = ("cat", "dog", "red car")
    lm = load(ModelSpec(f"hf:{saved['clip']}", classes=names, prompts=("a photo of a {}", "{} .")))
    a = lm.adapter
    x = torch.randn(2, 3, *a.input_size)
    clip = CLIPModel.from_pretrained(saved["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(saved["clip"])
    with torch.inference_mode():
        # one template: the logits are CLIPModel's own logits_per_image
        single = load(ModelSpec(f"hf:{saved['clip']}", classes=names, prompts=("a photo of a {}",))).adapter
        text = proc.tokenizer([f"a photo of a {n}" for n in names], padding=True, return_tensors="pt")
        ref = clip(pixel_values=x, **text).logits_per_image
        torch.testing.assert_close(single.logits(x), ref, rtol=0, atol=1e-5)
        tokens = a.embed(x)
        for layer in range(a.num_layers):
            tokens = a.block(layer, tokens)
        torch.testing.assert_close(a.readout(tokens), a.logits(x), rtol=0, atol=1e-5)
    assert a.supports_prefix and lm.num_classes == 3 and lm.adapter.input_size == (32, 32)


def test_transform_follows_the_image_processor(saved):
    from PIL import Image
    from transformers import AutoImageProcessor

    lm = load(ModelSpec(f"hf:{saved['internvl']}", classes=CLASSES))
    img = Image.new("RGB", (32, 32), (200, 30, 90))
    want = AutoImageProcessor.from_pretrained(saved["internvl"])(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(lm.transform(img), want, rtol=0, atol=1e-2)


def test_fingerprint_changes_with_classes_and_prompts(saved):
    base = load(ModelSpec(f"hf:{saved['clip']}", classes=CLASSES)).fingerprint
    other = load(ModelSpec(f"hf:{saved['clip']}", classes=CLASSES, prompts=("a {}",))).fingerprint
    assert base["options"] != other["options"] and base["weights"] == other["weights"]
    json.dumps(base)  # run.json records it


@pytest.mark.parametrize("spec, message", [
    (ModelSpec("hf:/nonexistent/dir", classes=("a",)), "hf download"),
    (ModelSpec("hf:some-org/some-model-not-cached", classes=("a",)), "never downloads"),
    (ModelSpec("hf:{clip}", classes=("a", "b"), prompts=("a photo of a cat",)), "needs {}"),
    (ModelSpec("hf:{llava}", classes=("a", "b"), prompts=("What is this?",)), "{classes}"),
    (ModelSpec("hf:{llava}"), "needs class names"),
    (ModelSpec("hf:{llava}", classes=("a", "a")), "distinct"),
    (ModelSpec("hf:{clip}", classes=("a", "b"), heads="vision+text"), "vision tower"),
    (ModelSpec("hf:{llava}", classes=("a", "b"), img_size=64), "timm options"),
])
def test_bad_hf_models_are_named(saved, spec, message, monkeypatch):
    import dataclasses

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = dataclasses.replace(spec, name=spec.name.format(**saved))
    with pytest.raises(ModelError, match=message):
        load(spec)


def test_unknown_architecture_is_named(saved, tmp_path):
    import shutil

    path = tmp_path / "odd"
    shutil.copytree(saved["llava"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(ModelError, match="model_type 'qwen2_vl'.*supported: clip, internvl, internvl_chat, llava, llava_next"):
        load(ModelSpec(f"hf:{path}", classes=("a", "b")))


def test_object_storage_path_is_copied_once(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("CIGMA_RAY_CACHE", str(tmp_path / "cache"))
    url = f"file://{saved['clip']}"  # any fsspec URL but a plain path takes the copy route
    from cigma_ray.models.hf.common import copy_to_cache

    local = copy_to_cache(url)
    assert os.path.isfile(os.path.join(local, "config.json")) and os.path.isfile(os.path.join(local, ".complete"))
    assert copy_to_cache(url) == local


def test_device_plan_splits_only_over_several_visible_gpus():
    """Unmeasured on GPUs here: what a replica holding k GPUs passes to from_pretrained."""
    gb = 1 << 30
    assert device_plan("cpu", []) is None
    assert device_plan("cuda", [80 * gb]) is None  # one GPU: the model moves there whole
    assert device_plan("cuda:1", [80 * gb, 80 * gb]) is None  # an explicit device is kept
    plan = device_plan("cuda", [40 * gb, 40 * gb])
    assert plan == {"device_map": "auto", "max_memory": {0: int(40 * gb * 0.85), 1: int(40 * gb * 0.85)}}


def test_a_run_rebuilds_the_same_model_from_its_record(saved):
    """prune, export and report rebuild the scanned model from run.json's model section."""
    from cigma_ray.rundir import scanned_model_spec

    spec = ModelSpec(f"hf:{saved['llava']}", classes=CLASSES, heads="vision+text", prompts=("Is it {classes}?",))
    fp = load(spec).fingerprint
    meta = {"model": json.loads(json.dumps({k: fp[k] for k in ("name", "model_kwargs", "img_size", "num_classes",
                                                               "input_size", "weights", "checkpoint", "options")})),
            "config": {"seed": 0}}
    assert scanned_model_spec(meta) == ModelSpec(**{**spec.__dict__, "num_classes": 3})
    assert load(scanned_model_spec(meta)).fingerprint == fp


@pytest.mark.parametrize("kind", ["llava", "internvl"])
def test_the_ray_driver_describes_a_vlm_without_its_weights(saved, kind):
    spec = ModelSpec(f"hf:{saved[kind]}", classes=CLASSES, heads="vision+text")
    meta, cpu = load(spec, "meta"), load(spec, "cpu")
    assert all(p.device.type == "meta" for p in meta.adapter.model.parameters())  # nothing of the weights is held
    assert meta.adapter.heads_per_layer == cpu.adapter.heads_per_layer and meta.num_classes == cpu.num_classes
    assert meta.fingerprint == cpu.fingerprint and meta.adapter.input_size == cpu.adapter.input_size
    assert next(cpu.adapter.model.parameters()).dtype == torch.float32  # fp32 runs keep fp32 weights


@pytest.mark.parametrize("kind", ["llava", "internvl", "llava_next"])
def test_vision_prefix_sharing_equals_whole_model_forwards(saved, kind):
    """The vision layers below an ablated head computed once (embed, block, finish with stand-in layers)
    give what the whole-model forward with the keep-mask gives (itself equal to weight zeroing, above)."""
    from cigma_ray.engine import scan_heads

    adapter = load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES)).adapter
    assert adapter.supports_prefix == (kind != "llava_next")  # LLaVA-NeXT's tiles: whole-model forwards
    views = [torch.randn(3, 3, *adapter.input_size, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    fast = scan_heads(adapter, views[0], views[1], adapter.heads, batch_size=4, images_no_fg=views[2])
    adapter.supports_prefix = False
    slow = scan_heads(adapter, views[0], views[1], adapter.heads, batch_size=4, images_no_fg=views[2])
    torch.testing.assert_close(fast.big, slow.big, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.fig, slow.fig, rtol=0, atol=1e-6)
    assert slow.big.std() > 1e-5  # the heads matter differently: the comparison can fail
    assert not load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES, heads="vision+text")).adapter.supports_prefix
