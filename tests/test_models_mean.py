"""Mean ablation in models/: the gates' substitutes equal the definition (a hook that substitutes the mean), and
the pruned model as plain weights (heads zeroed, their means folded into the output projection's bias) and
the physically smaller model equal the masked model, for every timm ViT kind and the generic adapter."""
from __future__ import annotations

import pytest
import torch

from cigma_ray.engine import Replica
from cigma_ray.engine.reference import substituted_head
from cigma_ray.models import ModelError, ModelSpec, load
from cigma_ray.models.attention import find_attentions
from cigma_ray.models.surgery import (
    attentions_of,
    load_smaller,
    output_heads_state_dict,
    plain_timm_model,
    save_smaller,
    smaller_model,
    zeroed_state_dict,
)
from cigma_ray.models.timm_generic import TimmGenericAdapter

from helpers import VIT_KINDS, perturb


def loaded(kind: str, num_classes: int = 4):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=num_classes, model_kwargs=kwargs))
    perturb(lm.adapter.model)
    return lm


def means_of(lm, n: int = 6) -> list[torch.Tensor]:
    x = torch.randn(n, 3, *lm.adapter.input_size, generator=torch.Generator().manual_seed(5))
    sums = Replica(lm).head_output_sums(x)
    return [(s / c).float() for s, c in zip(sums.sums, sums.counts)]


def substituted_logits(model, pairs, means, heads, x):
    """The definition: each removed head's output replaced by its mean, by a hook, whole model."""
    import contextlib

    with contextlib.ExitStack() as stack, torch.no_grad():
        for layer, head in heads:
            proj, count = pairs[layer]
            stack.enter_context(substituted_head(proj, head, count, means[layer]))
        return model(x)


@pytest.mark.parametrize("kind", list(VIT_KINDS))
def test_folded_and_smaller_models_equal_mean_ablation(kind, tmp_path):
    lm = loaded(kind)
    name, kwargs = VIT_KINDS[kind]
    a = lm.adapter
    means = means_of(lm)
    a.gates.set_means(means)
    last = a.num_layers - 1
    heads = [(0, h) for h in range(a.heads_per_layer[0])] + [(last, 1)]  # layer 0 loses every head
    x = torch.randn(3, 3, *a.input_size)
    replica = Replica(lm)
    masked = replica.logits(x, replica.keep_without(heads))
    pairs = list(zip(a.gates.projections, a.heads_per_layer))
    definition = substituted_logits(a.model, pairs, means, heads, x)
    torch.testing.assert_close(masked, definition, rtol=0, atol=1e-5)

    a.gates.set_means(None)
    zero = replica.logits(x, replica.keep_without(heads))
    assert (zero - masked).abs().max() > 1e-3  # the means matter, so the checks mean something

    state = zeroed_state_dict(attentions_of(lm), a.model, heads, means)
    folded = plain_timm_model(name, 4, kwargs, state)  # plain timm, nothing of cigma_ray
    small = smaller_model(folded, heads)
    save_smaller(small, str(tmp_path / "small.pt"), name, 4, kwargs, [])
    with torch.inference_mode():
        got_folded, got_small, got_reloaded = folded(x), small(x), load_smaller(str(tmp_path / "small.pt"))(x)
    torch.testing.assert_close(got_folded, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_small, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_reloaded, got_small, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(a.model(x), replica.logits(x), rtol=0, atol=0)  # the model was left intact


def test_generic_adapter_and_output_projection_folding_equal_mean_ablation():
    """Any attention: zeroing the head's W_O columns and folding its mean into the bias (how Hugging Face
    weights are exported) equals the generic adapter's mean ablation."""
    lm = loaded("vit")
    means = means_of(lm)
    generic = TimmGenericAdapter(lm.adapter.model, lm.adapter.input_size)
    generic.gates.set_means(means)
    heads = [(0, 2), (1, 0), (1, 1)]
    x = torch.randn(2, 3, *lm.adapter.input_size)
    keep = {0: torch.tensor([[1.0, 1, 0]]).expand(2, -1), 1: torch.tensor([[0.0, 0, 1]]).expand(2, -1)}
    with torch.no_grad():
        masked = generic.logits(x, keep)
    pairs = [(a.proj, a.num_heads) for a in find_attentions(lm.adapter.model)]
    torch.testing.assert_close(masked, substituted_logits(lm.adapter.model, pairs, means, heads, x), rtol=0, atol=1e-5)
    name, kwargs = VIT_KINDS["vit"]
    folded = plain_timm_model(name, 4, kwargs, output_heads_state_dict(lm.adapter.model, pairs, heads, means))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), masked, rtol=0, atol=1e-5)


def test_a_projection_without_bias_cannot_take_a_folded_mean():
    name, kwargs = VIT_KINDS["vit"]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=4, model_kwargs={**kwargs, "proj_bias": False}))
    means = means_of(lm)
    with pytest.raises(ModelError, match="no bias.*ablation: zero"):
        zeroed_state_dict(attentions_of(lm), lm.adapter.model, [(0, 0)], means)
    zeroed_state_dict(attentions_of(lm), lm.adapter.model, [(0, 0)])  # zero ablation needs no bias


def test_bad_means_are_refused():
    lm = loaded("vit")
    with pytest.raises(ValueError, match="layers of means"):
        lm.adapter.gates.set_means([None])
    with pytest.raises(ValueError, match="layer 1: a mean of 5 values"):
        lm.adapter.gates.set_means([None, torch.zeros(5), None])
