"""Memory of a replica: estimates against measurements, micro-batched masks, non-finite logits, split models."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from cigma_ray.config import Config  # noqa: E402
from cigma_ray.engine import Replica, scan_heads  # noqa: E402
from cigma_ray.engine.checks import NonFiniteLogits  # noqa: E402
from cigma_ray.engine.memory import estimate_memory, kv_cache_bytes, micro_batches  # noqa: E402
from cigma_ray.models import ModelSpec, load  # noqa: E402
from cigma_ray.models.base import HeadGates  # noqa: E402

from hf_tiny import SAVERS  # noqa: E402

CLASSES = ("red car", "red bus", "cat")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfmem")
    return {kind: SAVERS[kind](str(root / kind)) for kind in ("llava", "internvl")}


def saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the tensors autograd keeps for the backward, each storage once, the model's own weights excluded."""
    seen = {(t.untyped_storage().data_ptr(), t.dtype) for t in [*model.parameters(), *model.buffers()]}
    total = [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("kind", ["internvl", "llava"])
def test_mask_stage_estimate_follows_what_autograd_keeps(kind):
    """One image through a VLM classifier (prompt, 5 classes of 3 tokens) with a gradient to its pixels:
    the estimate is within 0.7x-1.3x of the bytes autograd keeps (SDPA on the CPU, fp32), at widths
    where the per-token terms dominate as they do in real models."""
    from transformers import (
        CLIPVisionConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from cigma_ray.models.hf.sizes import image_tokens
    from cigma_ray.models.hf.vlm import ARCHITECTURES, VLMClassifier

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    if kind == "internvl":
        vision = InternVLVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=112, patch_size=14, use_qk_norm=True, norm_type="rms_norm")
        config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=999, image_seq_length=16)
        vlm = InternVLForConditionalGeneration(config)
    else:
        vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=112, patch_size=14)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-2)
        vlm = LlavaForConditionalGeneration(config)
    vlm.eval().requires_grad_(False)
    prompt, classes, tokens = 40, 5, 3
    prefix = torch.cat([torch.randint(0, 900, (20,)), torch.full((image_tokens(config),), 999),
                        torch.randint(0, 900, (prompt - 20 + classes * tokens,))])[None]
    model = VLMClassifier(vlm, ARCHITECTURES[kind], prefix, [list(range(10 * c + 1, 10 * c + 1 + tokens))
                                                             for c in range(classes)], "sequence")
    x = torch.randn(1, 3, 112, 112, requires_grad=True)
    measured = saved_activation_bytes(model, lambda: model(x).sum())
    params = sum(p.numel() for p in vlm.parameters())
    est = estimate_memory(config, precision="fp32", classes=classes, class_tokens=tokens, prompt_tokens=prompt)
    assert 0.7 < est.mask_per_image / measured < 1.3, (est.mask_per_image, measured)
    assert est.weights == 4 * params  # counted on the meta device


def test_key_value_cache_estimate_is_the_cache_a_forward_keeps(saved):
    lm = load(ModelSpec(f"hf:{saved['llava']}", classes=CLASSES))
    model = lm.adapter.model
    with torch.inference_mode():
        out = model.vlm(input_ids=model.prefix_ids.expand(2, -1), pixel_values=torch.randn(2, 3, 32, 32), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 2 * kv_cache_bytes(model.vlm.config.text_config, model.prefix_ids.shape[1], 4)


def test_micro_batches_fit_beside_the_weights():
    from transformers import InternVLConfig

    est = estimate_memory(InternVLConfig(), params=1_000_000_000)
    gb = 1 << 30
    fit = micro_batches(est, 80 * gb)
    assert fit["fits"] and fit["mask"] == int((80 * gb * 0.9 - 2e9) // est.mask_per_image)
    assert micro_batches(est, 1 * gb) == {"mask": 0, "scan": 0, "free": int(gb * 0.9 - 2e9), "fits": False}
    assert micro_batches(est, 2 * gb, gpus=2)["free"] == int(2 * gb * 0.9 - 1e9)
    more = estimate_memory(InternVLConfig(), params=1_000_000_000, classes=1000)
    assert more.scoring_per_image > est.scoring_per_image  # grows with the answer tokens...
    assert more.scoring_per_image < 1000 / 10 * est.scoring_per_image  # ...not with copies of the prefix


@pytest.mark.parametrize("kind", ["timm", "llava"])
def test_mask_micro_batches_sum_the_same_gradients_and_are_fixed_per_run(saved, tiny_checkpoint, kind):
    """Losses are summed and Adam is elementwise, so slicing a mask batch into micro-batches gives each image
    exactly its own gradient: with a forward that computes each image alone, the masks are bit-identical. A
    batched forward is not batch-size invariant on every device (here: the CPU's GEMMs round differently), so
    real micro-batches change the masks by float rounding: `mask_micro_batch` is a result key, fixed per run."""
    from cigma_ray.method import optimise_masks, probs

    if kind == "timm":
        path, name, kwargs = tiny_checkpoint
        spec = ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)
    else:
        spec = ModelSpec(f"hf:{saved['llava']}", classes=CLASSES)
    replica = Replica(load(spec))
    images = torch.randn(4, 3, *replica.adapter.input_size, generator=torch.Generator().manual_seed(0))

    def one_by_one(x):
        return torch.cat([replica._logits(x[i: i + 1]) for i in range(len(x))])
    with torch.no_grad():
        q = probs(one_by_one(images))
    whole = optimise_masks(one_by_one, images, q, mask_steps=3)
    for micro in (1, 3):
        assert torch.equal(optimise_masks(one_by_one, images, q, mask_steps=3, micro_batch=micro), whole)
    assert whole.std() > 0  # the masks moved

    cfg = Config(mask_steps=3, mask_batch=4, mask_micro_batch=3)
    batched = replica.masks(images, cfg)
    assert torch.equal(replica.masks(images, cfg).mask, batched.mask)  # reproducible for the run's setting
    assert "mask_micro_batch" in Config.RESULT_KEYS


def test_nan_logits_stop_a_replica_with_the_models_name(tiny_checkpoint):
    path, name, kwargs = tiny_checkpoint
    loaded = load(ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs))
    replica = Replica(loaded)
    images = torch.randn(2, 3, *replica.adapter.input_size)
    with torch.no_grad():
        replica.adapter.model.head.bias[1] = float("nan")
    with pytest.raises(NonFiniteLogits, match=f"timm:{name} returned NaN class logits for 2 of 2"):
        replica.logits(images)
    with pytest.raises(NonFiniteLogits, match="NaN"):
        replica.masks(images, Config(mask_steps=1, mask_batch=2))
    with pytest.raises(NonFiniteLogits, match=f"timm:{name}"):
        replica.scan(images, torch.ones(2, 32, 32, dtype=torch.bool), [(0, 0)], 1.0)
    with torch.no_grad():
        replica.adapter.model.head.bias[1] = float("inf")
    with pytest.raises(NonFiniteLogits, match="infinite"):
        scan_heads(replica.adapter, images, images, [(0, 0)])


def test_keep_masks_follow_the_activations_device():
    """A layer on another device than the keep-masks (a model split over GPUs): the mask goes to the layer.
    Here the layer's activations are on the meta device and the masks on the CPU."""
    proj = torch.nn.Linear(8, 4, device="meta")
    gates = HeadGates([(proj, 2)])
    with gates.use({0: torch.tensor([[1.0, 0.0]])}):
        out = proj(torch.empty(1, 3, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, 4)


def test_vision_stand_ins_restore_the_forward_accelerate_installed(saved):
    """accelerate's device hooks replace a layer's forward on the instance; the prefix-shared scan's stand-ins
    must put it back, and the hooked model must still give the whole-model result."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from cigma_ray.models.hf.vlm import stand_ins

    adapter = load(ModelSpec(f"hf:{saved['internvl']}", classes=CLASSES)).adapter
    x = torch.randn(2, 3, *adapter.input_size)
    with torch.inference_mode():
        want = adapter.logits(x)
    for layer in adapter.layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    hooked = [layer.__dict__["forward"] for layer in adapter.layers]
    with stand_ins(adapter.layers, lambda t: t):
        assert all(layer.__dict__["forward"] is not f for layer, f in zip(adapter.layers, hooked))
    assert [layer.__dict__["forward"] for layer in adapter.layers] == hooked
    with torch.inference_mode():
        tokens = adapter.embed(x)
        tokens = adapter.block(0, tokens)
        torch.testing.assert_close(adapter.finish(tokens), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.logits(x), want, rtol=0, atol=0)


def test_a_chat_template_that_writes_bos_gives_one_bos(saved, tmp_path):
    import shutil

    from transformers import AutoProcessor

    path = tmp_path / "bos"
    shutil.copytree(saved["llava"], path)
    processor = AutoProcessor.from_pretrained(path)
    processor.chat_template = ("{{ bos_token }}{% for m in messages %}USER: {% for c in m['content'] %}"
                               "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                               "{% endfor %} ASSISTANT:")
    processor.save_pretrained(path)
    ids = load(ModelSpec(f"hf:{path}", classes=CLASSES)).adapter.model.prefix_ids[0].tolist()
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1


def test_llava_does_not_scan_the_vision_layer_it_never_reads(saved):
    a = load(ModelSpec(f"hf:{saved['llava']}", classes=CLASSES, heads="vision+text")).adapter
    assert list(a.skipped_layers) == [1] and "vision_feature_layer -2" in a.skipped_layers[1]
    assert all(layer != 1 for layer, _ in a.scanned_heads) and len(a.scanned_heads) == len(a.heads) - 4
    x = torch.randn(2, 3, *a.input_size)
    with torch.inference_mode():  # why: ablating its heads changes nothing
        torch.testing.assert_close(a.logits(x, {1: torch.zeros(2, 4)}), a.logits(x), rtol=0, atol=0)


def test_a_vlm_on_a_gpu_defaults_to_bf16():
    from cigma_ray.engine.memory import default_precision

    assert default_precision("hf:/models/InternVL2-26B", "cuda") == "bf16"
    assert default_precision("hf:/models/InternVL2-26B", "cpu") == "fp32"
    assert default_precision("timm:vit_base_patch16_224", "cuda:0") == "fp32"


def test_a_loaded_vlms_estimate_uses_its_real_prompt_and_the_scan_batch_fits_it(saved):
    """On a GPU the replica starts its scan at a batch the estimate says fits (engine.memory.scan_batch); the
    estimate takes the loaded classifier's real prompt length, class count and parameters."""
    from cigma_ray.engine.memory import replica_estimate, scan_batch

    adapter = load(ModelSpec(f"hf:{saved['internvl']}", classes=CLASSES)).adapter
    est = replica_estimate(adapter, "bf16")
    assert est.tokens["text"] == adapter.model.prefix_ids.shape[1]  # the image's tokens, the question, the classes
    assert est.weights == 2 * sum(p.numel() for p in adapter.model.parameters())
    room = est.weights / 0.9 + 5.5 * est.scan_per_forward / 0.9  # 5 image-forwards fit beside the weights
    assert scan_batch(64, est, int(room)) == 5 and scan_batch(4, est, int(room)) == 4
    assert scan_batch(64, est, int(est.weights)) == 1  # never below one: the scan halves on out-of-memory anyway
    assert scan_batch(64, None, 1) == 64  # timm and CLIP: no estimate
    tiny = load(ModelSpec("timm:vit_tiny_patch16_224", random_weights=True, num_classes=3,
                          model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3))).adapter
    assert replica_estimate(tiny, "fp32") is None
