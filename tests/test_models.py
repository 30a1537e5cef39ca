"""Adapters and surgery (models/): embed -> blocks -> readout equals the model, the keep-mask equals weight zeroing, zeroed and smaller models equal the keep-mask ablation, attention rollout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cigma_ray.engine import Replica
from cigma_ray.models import ModelError, ModelSpec, load
from cigma_ray.models.attention import find_attentions
from cigma_ray.models.surgery import (
    attentions_of,
    load_smaller,
    parameters,
    plain_timm_model,
    save_smaller,
    smaller_model,
    zeroed_head,
    zeroed_state_dict,
)

from helpers import VIT_KINDS, perturb


def ablated_logits(lm, x: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """The scan's own ablation: per-layer keep-masks on the heads' outputs."""
    replica = Replica(lm)
    return replica.logits(x, replica.keep_without(heads))


def loaded(kind: str, num_classes: int = 5):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=num_classes, model_kwargs=kwargs))
    perturb(lm.adapter.model)
    return lm


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_prefix_path_equals_forward(kind):
    a = loaded(kind).adapter
    assert a.supports_prefix
    x = torch.randn(4, 3, *a.input_size)
    tokens = a.embed(x)
    for layer in range(a.num_layers):
        tokens = a.block(layer, tokens)
    torch.testing.assert_close(a.readout(tokens), a.model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, rows", [("vit", 1), ("deit_distilled", 2), ("dinov2_reg", 1), ("vit_avg", None)])
def test_last_block_for_the_readout_rows_only_equals_the_whole_block(kind, rows):
    """`finish` computes the last block for the class (and distillation) token only; same logits,
    with and without keep-masks in that block, as the whole block then the read-out."""
    a = loaded(kind).adapter
    assert a.readout_rows == rows
    last = a.num_layers - 1
    tokens = a.embed(torch.randn(4, 3, *a.input_size))
    for layer in range(last):
        tokens = a.block(layer, tokens)
    keep = torch.ones(4, a.heads_per_layer[last])
    keep[0, 0] = keep[2, -1] = keep[3] = 0
    for k in (None, keep):
        torch.testing.assert_close(a.finish(tokens, k), a.readout(a.block(last, tokens, k)), rtol=0, atol=1e-5)
    assert not torch.allclose(a.finish(tokens, keep), a.finish(tokens))  # the mask does act


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_keep_mask_equals_weight_zeroing(kind):
    a = loaded(kind).adapter
    x = torch.randn(3, 3, *a.input_size)
    attns = [b.attn for b in a.model.blocks]
    for layer, head in [(0, 0), (a.num_layers - 1, a.heads_per_layer[-1] - 1), (1, 1)]:
        keep = torch.ones(3, a.heads_per_layer[layer])
        keep[:, head] = 0
        masked = a.logits(x, {layer: keep})
        with zeroed_head(attns[layer], head):
            zeroed = a.model(x)
        assert (masked - a.model(x)).abs().max() > 1e-3  # the head matters, so the check means something
        torch.testing.assert_close(masked, zeroed, rtol=0, atol=1e-5)


def test_per_sample_keep_masks_are_independent():
    a = loaded("vit").adapter
    x = torch.randn(3, 3, *a.input_size)
    keep = torch.ones(3, 3)
    keep[1, 2] = 0
    out = a.logits(x, {1: keep})
    torch.testing.assert_close(out[[0, 2]], a.model(x[[0, 2]]), rtol=0, atol=1e-5)
    single = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(out[1:2], a.logits(x[1:2], {1: single}), rtol=0, atol=1e-5)


def test_gates_leave_model_untouched_after_use():
    a = loaded("vit").adapter
    x = torch.randn(2, 3, *a.input_size)
    before = a.model(x)
    a.logits(x, {0: torch.zeros(2, 3)})
    torch.testing.assert_close(a.model(x), before, rtol=0, atol=0)


def test_heads_listing():
    a = loaded("dinov2_reg").adapter
    assert a.heads == [(l, h) for l in range(3) for h in range(3)]
    assert a.input_size == (28, 28)


def test_generic_adapter_on_windowed_attention():
    """Swin folds windows into the batch; the keep-mask must follow each image's windows."""
    lm = load(ModelSpec("timm:swin_tiny_patch4_window7_224", random_weights=True, num_classes=4,
                        model_kwargs=dict(img_size=32, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 3))))
    a = perturb(lm.adapter.model) and lm.adapter
    assert not a.supports_prefix and a.heads_per_layer == [2, 3]
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    out = a.logits(x, {1: keep})
    with zeroed_head(find_attentions(a.model)[1], 1):
        torch.testing.assert_close(out[1], a.model(x)[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], a.model(x)[0], rtol=0, atol=1e-6)


def test_model_input_size_is_the_models_own():
    lm = load(ModelSpec("timm:vit_small_patch14_dinov2", random_weights=True, num_classes=2,
                        model_kwargs=dict(img_size=56, depth=1)))
    assert lm.adapter.input_size == (56, 56)
    assert lm.transform.transforms[-3].size == (56, 56)  # the centre crop


@pytest.mark.parametrize("spec, message", [
    (ModelSpec("torchvision:resnet50", random_weights=True), "unknown model family"),
    (ModelSpec("timm:vit_nonexistent_model", random_weights=True), "timm has no model"),
    (ModelSpec("timm:vit_tiny_patch16_224", checkpoint="/nonexistent/weights.pth"), "file not found"),
    (ModelSpec("timm:resnet18", random_weights=True, num_classes=2), "no timm attention modules"),
    (ModelSpec("timm:vit_tiny_patch16_224", random_weights=True, model_kwargs={"not_an_arg": 1}), "--model-kwargs"),
])
def test_bad_models_are_named(spec, message):
    with pytest.raises(ModelError, match=message):
        load(spec)


def test_checkpoint_that_does_not_fit(tiny_checkpoint):
    path, name, kwargs = tiny_checkpoint
    with pytest.raises(ModelError, match="does not fit"):
        load(ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs={**kwargs, "depth": 2}))
    lm = load(ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs))
    assert lm.num_classes == 3  # read from the checkpoint's head
    assert lm.fingerprint["weights"].startswith("sha256:")


def test_missing_pretrained_weights_say_how_to_provide_them(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so set it too
    with pytest.raises(ModelError, match="--checkpoint FILE"):
        load(ModelSpec("timm:vit_tiny_patch16_224", model_kwargs={"depth": 1}))


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_zeroed_and_smaller_models_equal_the_keep_mask_ablation(kind, tmp_path):
    name, kwargs = VIT_KINDS[kind]
    lm = loaded(kind, num_classes=4)
    a = lm.adapter
    last = a.num_layers - 1
    heads = [(0, h) for h in range(a.heads_per_layer[0])] + [(last, 1)]  # layer 0 loses every head
    x = torch.randn(3, 3, *a.input_size)
    expected = ablated_logits(lm, x, heads)

    zeroed = plain_timm_model(name, 4, kwargs, zeroed_state_dict(attentions_of(lm), a.model, heads))
    small = smaller_model(zeroed, heads)
    save_smaller(small, str(tmp_path / "small.pt"), name, 4, kwargs, [])
    reloaded = load_smaller(str(tmp_path / "small.pt"))
    with torch.inference_mode():
        got_zeroed, got_small, got_reloaded, intact = zeroed(x), small(x), reloaded(x), a.model(x)

    assert (intact - expected).abs().max() > 1e-2  # the heads matter, so the checks mean something
    torch.testing.assert_close(got_zeroed, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_small, got_zeroed, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_reloaded, got_small, rtol=0, atol=0)
    assert [getattr(b.attn, "num_heads", 0) for b in reloaded.blocks] == \
        [0] + a.heads_per_layer[1:last] + [a.heads_per_layer[last] - 1]
    assert parameters(small) < parameters(zeroed)


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg", "deit_distilled", "vit_avg"])
def test_rollout_equals_the_one_from_timms_own_attention(kind):
    """The hook recomputes attention from `attn.qkv`; timm's unfused path exposes the real one."""
    import torch

    from cigma_ray.models import load
    from cigma_ray.models.attention import attention_rollout

    from helpers import VIT_KINDS

    name, kwargs = VIT_KINDS[kind]
    loaded = load(ModelSpec(f"timm:{name}", model_kwargs=kwargs, random_weights=True))
    model = loaded.adapter.model
    seen = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda module, args, out: seen.append(out.mean(dim=1)))
    x = torch.randn(2, 3, *loaded.adapter.input_size)
    with torch.no_grad():
        model(x)
    n = seen[0].shape[-1]
    rollout = torch.eye(n)
    for a in seen:
        rollout = (0.5 * a + 0.5 * torch.eye(n)) @ rollout
    prefix = model.num_prefix_tokens
    rows = {"vit": [0], "dinov2_reg": [0], "deit_distilled": [0, 1], "vit_avg": list(range(prefix, n))}[kind]
    expected = rollout[:, rows].mean(dim=1)[:, prefix:]
    got = attention_rollout(loaded, x, {}, [])
    np.testing.assert_allclose(got.reshape(2, -1), expected.numpy(), atol=1e-6)
