"""Mean ablation and the background-swap view in the fast scan equal their plain definitions: a forward hook
that substitutes the head's mean (whole model, one head at a time), and weight zeroing for SWAP^(-h); fp32."""
from __future__ import annotations

import pytest
import torch

from cigma_ray.engine import Replica, scan_heads
from cigma_ray.engine.reference import scan_by_mean_substitution, scan_by_weight_zeroing, substituted_head
from cigma_ray.method import choose_donors, counterfactuals, foreground_cells, js, probs, swapped
from cigma_ray.models import ModelSpec, load
from cigma_ray.models.attention import find_attentions
from cigma_ray.models.timm_generic import TimmGenericAdapter

from helpers import VIT_KINDS, perturb


def setup(kind: str, n: int = 5, seed: int = 0):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=4, model_kwargs=kwargs))
    perturb(lm.adapter.model, seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *lm.adapter.input_size, generator=gen)
    fg = foreground_cells(torch.rand(n, 32, 32, generator=gen), 0.35)
    return lm, images, fg


def means_of(lm, images) -> list[torch.Tensor]:
    sums = Replica(lm, batch_size=3).head_output_sums(images)
    return [(s / c).float() for s, c in zip(sums.sums, sums.counts)]


def pairs_of(adapter) -> list[tuple[torch.nn.Linear, int]]:
    return list(zip(adapter.gates.projections, adapter.heads_per_layer))


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_head_means_are_the_mean_of_each_projections_input_over_images_and_tokens(kind):
    lm, images, _ = setup(kind, n=7)
    seen = {}
    attns = find_attentions(lm.adapter.model)
    hooks = [a.proj.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0]))
             for i, a in enumerate(attns)]
    try:
        with torch.no_grad():
            lm.adapter.model(images)
    finally:
        for h in hooks:
            h.remove()
    got = means_of(lm, images)  # batches of 3: 3 + 3 + 1 images
    for layer, xs in seen.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1])
        torch.testing.assert_close(got[layer], x.double().mean(0).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_mean_ablation_scan_equals_substituting_the_mean(kind):
    lm, images, fg = setup(kind)
    means = means_of(lm, images)
    lm.adapter.gates.set_means(means)
    no_bg, no_fg = counterfactuals(images, fg)
    donors = images[torch.from_numpy(choose_donors([0, 1, 2, 0, 1], seed=0)[:, 0])]
    swap = swapped(images, fg, donors)
    heads = lm.adapter.heads
    expected = scan_by_mean_substitution(lm.adapter.model, pairs_of(lm.adapter), means, images, no_bg, heads,
                                         images_no_fg=no_fg, images_swap=swap)
    zeroed = scan_by_weight_zeroing(lm.adapter.model, find_attentions(lm.adapter.model), images, no_bg, heads,
                                    images_no_fg=no_fg, images_swap=swap)
    assert (expected.big - zeroed.big).abs().max() > 1e-3  # mean and zero ablation differ: the test can fail
    for batch_size in (4, 64):
        got = scan_heads(lm.adapter, images, no_bg, heads, batch_size=batch_size, images_no_fg=no_fg, images_swap=swap)
        for name in ("big", "fig", "swap"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-5)
    lm.adapter.gates.set_means(None)  # cleared: zero ablation again
    got = scan_heads(lm.adapter, images, no_bg, heads, batch_size=8, images_no_fg=no_fg, images_swap=swap)
    torch.testing.assert_close(got.big, zeroed.big, rtol=0, atol=1e-5)


def test_generic_adapter_mean_ablation_on_top_of_removed_heads_equals_the_definition():
    lm, images, fg = setup("vit", n=4)
    means = means_of(lm, images)
    generic = TimmGenericAdapter(lm.adapter.model, lm.adapter.input_size)
    generic.gates.set_means(means)
    lm.adapter.gates.set_means(means)
    no_bg, _ = counterfactuals(images, fg)
    removed = [(0, 1), (2, 2)]
    heads = [h for h in lm.adapter.heads if h not in removed]
    expected = scan_by_mean_substitution(lm.adapter.model, pairs_of(lm.adapter), means, images, no_bg, heads,
                                         removed=removed)
    fixed = {layer: k[0] for layer, k in Replica(lm).keep_without(removed).items()}
    for adapter in (generic, lm.adapter):  # the whole-model path and the prefix-shared one
        got = scan_heads(adapter, images, no_bg, heads, batch_size=5, removed=fixed)
        torch.testing.assert_close(got.big, expected.big, rtol=0, atol=1e-5)


def test_mean_substitution_reference_replaces_exactly_the_heads_slice():
    """What the projection reads under `substituted_head`: the head's slice is the mean at every row, the
    other heads' slices are untouched."""
    lm, images, _ = setup("vit", n=2)
    proj = find_attentions(lm.adapter.model)[1].proj
    mean = torch.arange(proj.in_features, dtype=torch.float32)
    seen = []
    with substituted_head(proj, 1, 3, mean):
        handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))  # runs after it
        try:
            with torch.no_grad():
                lm.adapter.model(images)
        finally:
            handle.remove()
    handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            lm.adapter.model(images)
    finally:
        handle.remove()
    dim = proj.in_features // 3
    substituted, intact = seen
    assert torch.equal(substituted[..., dim: 2 * dim], mean[dim: 2 * dim].expand_as(substituted[..., dim: 2 * dim]))
    assert torch.equal(substituted[..., :dim], intact[..., :dim]) and torch.equal(substituted[..., 2 * dim:],
                                                                                  intact[..., 2 * dim:])
    assert not torch.equal(substituted, intact)


@pytest.mark.parametrize("kind", ["vit", "deit_distilled"])
def test_swap_view_equals_weight_zeroing(kind):
    """SWAP^(-h) = JS(q^(-h)(I), q^(-h)(I_swap)) from the fast scan equals the whole-model zeroed-weights one."""
    lm, images, fg = setup(kind, n=6)
    donors = choose_donors([0, 1, 2, 0, 1, 2], seed=3)[:, 0]
    assert all(d % 3 != i % 3 for i, d in enumerate(donors))  # another class
    replica = Replica(lm, batch_size=5)
    heads = lm.adapter.heads
    got = replica.scan(images, fg, heads, 1.0, measure_fig=True, donor_images=images[torch.from_numpy(donors)])
    no_bg, no_fg = counterfactuals(images, fg)
    swap = swapped(images, fg, images[torch.from_numpy(donors)])
    expected = scan_by_weight_zeroing(lm.adapter.model, find_attentions(lm.adapter.model), images, no_bg, heads,
                                      images_no_fg=no_fg, images_swap=swap)
    for name in ("big", "fig", "swap"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-5)
    with torch.no_grad():
        intact = js(probs(lm.adapter.model(images)), probs(lm.adapter.model(swap)))
    torch.testing.assert_close(replica.swap_gains(images, fg, images[torch.from_numpy(donors)], 1.0), intact,
                               rtol=0, atol=1e-6)
    assert intact.mean() > 1e-3 and not torch.allclose(expected.swap, intact.expand_as(expected.swap), atol=1e-4)
    assert replica.scan(images, fg, heads, 1.0).swap is None
