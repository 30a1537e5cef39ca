"""The fast scan equals the plain definition: weight zeroing, one head at a time, whole model, fp32."""
from __future__ import annotations

import pytest
import torch

from cigma_ray.config import Config
from cigma_ray.engine import Replica, scan_heads
from cigma_ray.engine.reference import scan_by_weight_zeroing
from cigma_ray.engine.replica import halving_on_oom
from cigma_ray.method import (
    counterfactuals,
    foreground_cells,
    gains,
    js,
    probs,
)
from cigma_ray.models import ModelSpec, load
from cigma_ray.models.attention import find_attentions
from cigma_ray.models.surgery import zeroed_head
from cigma_ray.models.timm_generic import TimmGenericAdapter

from helpers import VIT_KINDS, perturb


def setup(kind: str, n: int = 5, seed: int = 0):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=4, model_kwargs=kwargs))
    perturb(lm.adapter.model, seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *lm.adapter.input_size, generator=gen)
    fg = foreground_cells(torch.rand(n, 32, 32, generator=gen), 0.35)
    no_bg, _ = counterfactuals(images, fg)
    return lm, images, no_bg


def reference(lm, images, no_bg, heads, tau=1.0):
    a = lm.adapter
    return scan_by_weight_zeroing(a.model, find_attentions(a.model), images, no_bg, heads, tau=tau).big


def oom_above(module: torch.nn.Module, limit: int):
    """A forward pre-hook that fails like a full GPU when a batch is larger than `limit`."""
    def check(_, args):
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"batch {args[0].shape[0]} > {limit}")
    return module.register_forward_pre_hook(check)


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_scan_equals_weight_zeroing(kind):
    lm, images, no_bg = setup(kind)
    heads = lm.adapter.heads
    expected = reference(lm, images, no_bg, heads)
    assert expected.abs().mean() > 1e-3  # outputs are informative, so 1e-5 is a real bound
    got = scan_heads(lm.adapter, images, no_bg, heads, batch_size=8).big
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 64])
def test_scan_does_not_depend_on_batch_size(batch_size):
    lm, images, no_bg = setup("dinov2_reg", n=6)
    heads = lm.adapter.heads
    expected = reference(lm, images, no_bg, heads)
    got = scan_heads(lm.adapter, images, no_bg, heads, batch_size=batch_size).big
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_scan_does_not_depend_on_chunking_of_heads_and_images():
    """Any split of heads (layer ranges, scattered subsets) and of images gives the same numbers."""
    lm, images, no_bg = setup("vit", n=6)
    heads = lm.adapter.heads
    whole = scan_heads(lm.adapter, images, no_bg, heads, batch_size=16).big
    by_layer = torch.cat([scan_heads(lm.adapter, images, no_bg, [h for h in heads if h[0] == layer], batch_size=5).big
                          for layer in range(lm.adapter.num_layers)])
    torch.testing.assert_close(by_layer, whole, rtol=0, atol=1e-5)
    subset = [heads[7], heads[2], heads[4]]  # out of order, across layers
    got = scan_heads(lm.adapter, images, no_bg, subset, batch_size=3).big
    torch.testing.assert_close(got, whole[[7, 2, 4]], rtol=0, atol=1e-5)
    halves = torch.cat([scan_heads(lm.adapter, images[s], no_bg[s], heads, batch_size=4).big
                        for s in (slice(0, 2), slice(2, 6))], dim=1)
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-5)


def test_generic_adapter_scan_equals_weight_zeroing():
    lm, images, no_bg = setup("vit", n=4)
    generic = TimmGenericAdapter(lm.adapter.model, lm.adapter.input_size)
    heads = lm.adapter.heads
    expected = reference(lm, images, no_bg, heads)
    torch.testing.assert_close(scan_heads(generic, images, no_bg, heads, batch_size=5).big, expected, rtol=0, atol=1e-5)


def test_temperature_is_applied():
    lm, images, no_bg = setup("vit", n=3)
    heads = lm.adapter.heads[:4]
    expected = reference(lm, images, no_bg, heads, tau=2.5)
    torch.testing.assert_close(scan_heads(lm.adapter, images, no_bg, heads, tau=2.5).big, expected, rtol=0, atol=1e-5)


def test_replica_gains_and_pruning_match_definitions():
    lm, images, _ = setup("vit", n=4)
    replica = Replica(lm, batch_size=3)
    gen = torch.Generator().manual_seed(1)
    fg = foreground_cells(torch.rand(4, 32, 32, generator=gen), 0.35)
    no_bg, no_fg = counterfactuals(images, fg)
    m = lm.adapter.model
    fig, big = replica.gains(images, fg, tau=1.0)
    e_fig, e_big = gains(probs(m(images)), probs(m(no_fg)), probs(m(no_bg)))
    for a, b in ((fig, e_fig), (big, e_big)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # two heads ablated together == both zeroed at once
    removed = [(0, 1), (2, 0)]
    attns = find_attentions(m)
    with zeroed_head(attns[0], 1), zeroed_head(attns[2], 0):
        expected = m(images)
    torch.testing.assert_close(replica.logits(images, replica.keep_without(removed)), expected, rtol=0, atol=1e-5)


def test_bf16_is_selectable_and_close():
    lm, images, no_bg = setup("vit", n=4)
    fp32 = Replica(lm, precision="fp32")
    bf16 = Replica(lm, precision="bf16")
    fg = foreground_cells(torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(2)), 0.35)
    heads = lm.adapter.heads
    a, b = fp32.scan(images, fg, heads, 1.0).big, bf16.scan(images, fg, heads, 1.0).big
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)  # bf16 really ran
    assert (a - b).abs().max() < 0.05 * a.abs().max() + 1e-3
    with pytest.raises(ValueError, match="precision"):
        Replica(lm, precision="fp8")


def test_replica_masks_follow_the_definition_and_ignore_batch_size():
    """A unit's masks are learned as one batch, so batch_size (memory) never changes them."""
    lm, images, _ = setup("vit", n=4)
    cfg = Config(mask_steps=5)
    one = Replica(lm, batch_size=4).masks(images, cfg)
    two = Replica(lm, batch_size=2).masks(images, cfg)
    assert torch.equal(one.mask, two.mask) and torch.equal(one.fg, two.fg)
    assert (one.mask != 0.5).any()
    assert all(int(f.sum()) == round(0.35 * 32 * 32) for f in one.fg)
    m = lm.adapter.model
    no_bg, no_fg = counterfactuals(images, one.fg)
    torch.testing.assert_close(one.big, js(probs(m(images)), probs(m(no_bg))), rtol=0, atol=1e-6)
    torch.testing.assert_close(one.fig, js(probs(m(images)), probs(m(no_fg))), rtol=0, atol=1e-6)


def test_out_of_memory_halves_the_batch_size_and_keeps_results():
    lm, images, no_bg = setup("vit", n=6)
    fg = foreground_cells(torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(3)), 0.35)
    heads = lm.adapter.heads
    roomy = Replica(lm, batch_size=64)
    want_logits, want_scan = roomy.logits(images), roomy.scan(images, fg, heads, 1.0).big
    tight = Replica(lm, batch_size=64)
    hook = oom_above(lm.adapter.model.patch_embed, 5)
    try:
        torch.testing.assert_close(tight.logits(images), want_logits, rtol=0, atol=1e-6)
        assert tight.batch_size == 4  # 64 -> 32 -> 16 -> 8 -> 4
        torch.testing.assert_close(tight.scan(images, fg, heads, 1.0).big, want_scan, rtol=0, atol=1e-6)
        assert tight.batch_size == 4  # the scan sends twice the images per pair: 4 images = 2 pairs fit
        with pytest.raises(torch.OutOfMemoryError, match="mask_batch"):
            tight.masks(images, Config(mask_steps=2, mask_batch=6))  # halving would change masks: a clear error
    finally:
        hook.remove()
    with pytest.raises(torch.OutOfMemoryError):  # nothing fits at all
        halving_on_oom(lambda size: (_ for _ in ()).throw(torch.OutOfMemoryError("full")), 8)


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg"])
def test_scan_on_top_of_removed_heads_equals_weight_zeroing(kind):
    """Iterative rounds: heads removed for good stay zeroed; each scanned head is zeroed on top."""
    lm, images, _ = setup(kind)
    removed = [(0, 1), (2, 0), (2, 2)]
    heads = [h for h in lm.adapter.heads if h not in removed]
    fg = foreground_cells(torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(0)), 0.35)
    replica = Replica(lm, batch_size=4)
    no_bg, _ = counterfactuals(images, fg)
    assert not torch.allclose(replica.scan(images, fg, heads, 1.0).big, replica.scan(images, fg, heads, 1.0, removed=removed).big,
                              atol=1e-4)  # the removal matters
    expected = scan_by_weight_zeroing(lm.adapter.model, find_attentions(lm.adapter.model), images, no_bg, heads,
                                      removed=removed).big
    torch.testing.assert_close(replica.scan(images, fg, heads, 1.0, removed=removed).big, expected, rtol=0, atol=1e-5)
    generic = TimmGenericAdapter(lm.adapter.model, lm.adapter.input_size)  # the whole-forward path
    fixed = {layer: k[0] for layer, k in replica.keep_without(removed).items()}
    torch.testing.assert_close(scan_heads(generic, images, no_bg, heads, batch_size=3, removed=fixed).big, expected,
                               rtol=0, atol=1e-5)


def test_masks_do_not_depend_on_the_thread_count():
    """Replicas run with their own thread counts; Adam amplifies any rounding difference, so the mask
    stage's forward must round the same way on 1 thread as on 2. (The scan's read-out-rows-only last
    block does not: its small matrix products split their sums over threads; the scan tolerates that,
    the masks would not.)"""
    lm, images, _ = setup("vit", n=6)
    masks = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            masks[threads] = Replica(lm).masks(images, Config(mask_steps=30, mask_batch=6)).mask
    finally:
        torch.set_num_threads(2)
    assert torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("kind", ["vit", "deit_distilled"])
def test_scan_measures_fig_exactly_like_weight_zeroing(kind):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", model_kwargs=kwargs, random_weights=True, num_classes=4))
    perturb(lm.adapter.model)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fg = torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.6
    no_bg, no_fg = counterfactuals(images, fg)
    heads = lm.adapter.heads
    model = lm.adapter.model
    expected = scan_by_weight_zeroing(model, find_attentions(model), images, no_bg, heads, images_no_fg=no_fg)
    for batch_size in (3, 7, 64):
        got = scan_heads(lm.adapter, images, no_bg, heads, batch_size=batch_size, images_no_fg=no_fg)
        torch.testing.assert_close(got.big, expected.big, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.fig, expected.fig, rtol=0, atol=1e-5)
    assert scan_heads(lm.adapter, images, no_bg, heads).fig is None
    # FIG^(-h) is JS(q^(-h)(I), q^(-h)(I_-fg)): with the head kept it is the intact FIG
    with torch.no_grad():
        intact = js(probs(model(images)), probs(model(no_fg)))
    assert not torch.allclose(expected.fig, intact.expand_as(expected.fig), atol=1e-4)
