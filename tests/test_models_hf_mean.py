"""Mean ablation and the background swap on Hugging Face models (CLIP, LLaVA, InternVL; tiny random configs):
the scan equals the definition (a hook that substitutes the head's mean, whole model, one head at a time),
a language model's means are over the prompt's tokens only, and the heads' means fold into plain weights."""
from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from cigma_ray.engine import Replica, scan_heads  # noqa: E402
from cigma_ray.engine.reference import scan_by_mean_substitution, substituted_head  # noqa: E402
from cigma_ray.method import counterfactuals, foreground_cells, swapped  # noqa: E402
from cigma_ray.models import ModelError, ModelSpec, load  # noqa: E402
from cigma_ray.models.surgery import output_heads_state_dict  # noqa: E402

from hf_tiny import SAVERS  # noqa: E402

CLASSES = ("red car", "red bus", "cat")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfmean")
    return {kind: SAVERS[kind](str(root / kind)) for kind in ("clip", "llava", "internvl")}


def means_of(lm, x) -> list[torch.Tensor]:
    sums = Replica(lm, batch_size=2).head_output_sums(x)
    return [(s / c).float() for s, c in zip(sums.sums, sums.counts)]


def pairs_of(adapter):
    return list(zip(adapter.gates.projections, adapter.heads_per_layer))


@pytest.mark.parametrize("kind, heads", [("clip", "vision"), ("llava", "vision"), ("internvl", "vision"),
                                         ("llava", "vision+text"), ("internvl", "vision+text")])
def test_mean_ablation_scan_equals_substituting_the_mean(saved, kind, heads):
    lm = load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES, heads=heads))
    a = lm.adapter
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, *a.input_size, generator=gen)
    means = means_of(lm, torch.randn(4, 3, *a.input_size, generator=gen))
    a.gates.set_means(means)
    fg = foreground_cells(torch.rand(3, 32, 32, generator=gen), 0.35)
    no_bg, no_fg = counterfactuals(x, fg)
    swap = swapped(x, fg, x[[1, 2, 0]])
    expected = scan_by_mean_substitution(a.model, pairs_of(a), means, x, no_bg, a.heads, images_no_fg=no_fg,
                                         images_swap=swap)
    got = scan_heads(a, x, no_bg, a.heads, batch_size=4, images_no_fg=no_fg, images_swap=swap)
    assert a.supports_prefix == (heads == "vision")  # both the prefix-shared and the whole-model path
    for name in ("big", "fig", "swap"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-5)
    assert expected.swap.std() > 1e-6  # heads matter differently: the comparison can fail


def test_language_model_means_are_over_the_prompts_tokens(saved):
    """The text heads' means: every token of the prompt's forward (image and question), once per image; the
    answers' tokens (continuations against the cache) are left out."""
    lm = load(ModelSpec(f"hf:{saved['llava']}", classes=CLASSES, heads="vision+text"))
    a = lm.adapter
    model = a.model
    x = torch.randn(2, 3, *a.input_size)
    first = a.layer_labels.index("text.0")
    proj = a.gates.projections[first]
    seen = []
    handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        sums = a.head_output_sums(x)
    finally:
        handle.remove()
    assert len(seen) > 1  # the answers ran too (sequence scoring of two-token classes)
    prefix = seen[0]
    assert prefix.shape[:2] == (2, model.prefix_ids.shape[1])
    assert sums.counts[first] == 2 * model.prefix_ids.shape[1]
    torch.testing.assert_close(sums.sums[first], prefix.reshape(-1, prefix.shape[-1]).double().sum(0), rtol=0,
                               atol=1e-9)
    with torch.no_grad():  # the next forward records nothing: recording ends with the block
        a.logits(x)
    assert a.gates.sums is None


@pytest.mark.parametrize("kind", ["clip", "llava", "internvl"])
def test_vision_heads_fold_into_plain_weights(saved, kind):
    """The vision heads' removal as weights of the Hugging Face module (W_O columns zeroed, the mean folded into
    the bias) equals mean ablation; the language model's projections have no bias, which is said."""
    lm = load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES, heads="vision" if kind == "clip" else "vision+text"))
    a = lm.adapter
    x = torch.randn(2, 3, *a.input_size)
    means = means_of(lm, x)
    a.gates.set_means(means)
    heads = [(0, 1), (0, 3), (1, 0)]
    replica = Replica(lm)
    masked = replica.logits(x, replica.keep_without(heads))
    with contextlib.ExitStack() as stack, torch.no_grad():
        for layer, head in heads:
            stack.enter_context(substituted_head(*pairs_of(a)[layer][:1], head, a.heads_per_layer[layer], means[layer]))
        torch.testing.assert_close(a.model(x), masked, rtol=0, atol=1e-5)
    module = a.model.vision if kind == "clip" else a.model.vlm
    state = output_heads_state_dict(module, pairs_of(a), heads, means)
    fresh = load(ModelSpec(f"hf:{saved[kind]}", classes=CLASSES)).adapter.model
    (fresh.vision if kind == "clip" else fresh.vlm).load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), masked, rtol=0, atol=1e-5)
    if kind != "clip":
        text = a.layer_labels.index("text.0")
        with pytest.raises(ModelError, match="no bias"):
            output_heads_state_dict(module, pairs_of(a), [(text, 0)], means)
