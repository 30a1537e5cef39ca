"""Issue 13: the gradient pre-screen equals finite differences of BIG and FIG in the head gates; its fidelity measures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cigma_ray.engine import scan_heads
from cigma_ray.engine.screen import gate_gradients, screen_images
from cigma_ray.method import counterfactuals, foreground_cells, js
from cigma_ray.method.fidelity import fidelity, screen_terms
from cigma_ray.method.scores import bir
from cigma_ray.method.stability import average_ranks, spearman
from cigma_ray.models import ModelSpec, load

from helpers import VIT_KINDS, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(kind: str, n: int = 3, seed: int = 0, dtype=torch.float64):
    name, kwargs = VIT_KINDS[kind]
    lm = load(ModelSpec(f"timm:{name}", random_weights=True, num_classes=4, model_kwargs=kwargs))
    perturb(lm.adapter.model, seed)
    lm.adapter.model.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *lm.adapter.input_size, generator=gen).to(dtype)
    fg = foreground_cells(torch.rand(n, 32, 32, generator=gen), 0.35)
    no_bg, no_fg = counterfactuals(images, fg)
    return lm.adapter, images, fg, no_bg, no_fg


def gains_at(adapter, views, gates: dict[int, torch.Tensor]):
    """(FIG_i, BIG_i) of the model with the given per-layer gate vectors, in the views' dtype."""
    n = views[0].shape[0]
    keep = {layer: g.to(views[0].dtype).expand(3 * n, -1) for layer, g in gates.items()}
    with torch.no_grad():
        logits = adapter.logits(torch.cat(views), keep)
    q = torch.softmax(logits.to(torch.float64), dim=-1).split(n)
    return js(q[0], q[2]), js(q[0], q[1])


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg"])
def test_gate_gradients_equal_finite_differences_in_float64(kind):
    adapter, images, _, no_bg, no_fg = setup(kind)
    got = gate_gradients(adapter, images, no_bg, no_fg, batch_size=2)
    assert got.grad_big.shape == (len(adapter.heads), 3) and got.grad_fig.shape == got.grad_big.shape
    assert got.grad_big.abs().max() > 1e-3  # informative: the tolerance below is a real bound
    eps = 1e-5
    for pos in (0, 4, len(adapter.heads) - 1):
        layer, head = adapter.heads[pos]
        up, down = (torch.ones(adapter.heads_per_layer[layer], dtype=torch.float64) for _ in range(2))
        up[head], down[head] = 1 + eps, 1 - eps
        (f_up, b_up), (f_down, b_down) = (gains_at(adapter, (images, no_bg, no_fg), {layer: g}) for g in (up, down))
        torch.testing.assert_close(got.grad_big[pos].double(), (b_up - b_down) / (2 * eps), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got.grad_fig[pos].double(), (f_up - f_down) / (2 * eps), rtol=1e-4, atol=1e-7)
    fig, big = gains_at(adapter, (images, no_bg, no_fg), {})
    torch.testing.assert_close(got.big.double(), big, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.fig.double(), fig, rtol=1e-6, atol=1e-7)


def test_gate_gradients_do_not_depend_on_the_batch_and_skip_fig_when_not_asked():
    adapter, images, fg, no_bg, no_fg = setup("vit", n=4, dtype=torch.float32)
    whole = gate_gradients(adapter, images, no_bg, no_fg, batch_size=4)
    ones = gate_gradients(adapter, images, no_bg, no_fg, batch_size=1)
    torch.testing.assert_close(ones.grad_big, whole.grad_big, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ones.grad_fig, whole.grad_fig, rtol=1e-4, atol=1e-6)
    only_big = screen_images(adapter, images, fg, measure_fig=False, batch_size=3)
    assert only_big.grad_fig is None and only_big.fig is None
    torch.testing.assert_close(only_big.grad_big, whole.grad_big, rtol=1e-4, atol=1e-6)


def test_removed_heads_stay_ablated_and_get_no_gradient():
    adapter, images, _, no_bg, no_fg = setup("vit")
    removed = {1: torch.tensor([1.0, 0.0, 1.0])}
    got = gate_gradients(adapter, images, no_bg, no_fg, removed=removed)
    pos = adapter.heads.index((1, 1))
    assert (got.grad_big[pos] == 0).all() and (got.grad_fig[pos] == 0).all()
    fig, big = gains_at(adapter, (images, no_bg, no_fg), removed)
    torch.testing.assert_close(got.big.double(), big, rtol=1e-6, atol=1e-7)


def test_fidelity_of_the_screen_against_the_exact_scan_on_a_tiny_model():
    """The screen's per-head scores next to the exact scan's: the fidelity numbers are well formed (how
    good they are on real models is measured in benchmarks, not promised by a test)."""
    adapter, images, _, no_bg, no_fg = setup("vit", n=4, dtype=torch.float32)
    got = gate_gradients(adapter, images, no_bg, no_fg)
    exact = scan_heads(adapter, images, no_bg, adapter.heads, batch_size=8, images_no_fg=no_fg)
    terms = screen_terms(got.grad_big.numpy(), got.grad_fig.numpy(), got.big.numpy(), got.fig.numpy())
    exact_drop = got.big.numpy()[None, :] - exact.big.numpy()
    f = fidelity(terms["big_drop"].mean(axis=1), exact_drop.mean(axis=1), 2)
    assert -1 <= f["spearman"] <= 1 and 0 <= f["recall_k"] <= f["recall_2k"] <= f["recall_4k"] <= 1
    assert set(terms) == {"big_drop", "bir_drop", "big_minus_fig"}


def test_hugging_face_clip_gate_gradients_equal_finite_differences(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from hf_tiny import save_clip

    lm = load(ModelSpec(f"hf:{save_clip(str(tmp_path / 'clip'))}", classes=("red car", "cat", "dog")))
    adapter = lm.adapter
    adapter.model.to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *adapter.input_size, generator=gen).double()
    fg = foreground_cells(torch.rand(2, 32, 32, generator=gen), 0.35)
    no_bg, no_fg = counterfactuals(images, fg)
    got = gate_gradients(adapter, images, no_bg, no_fg)
    assert got.grad_big.abs().max() > 1e-6
    eps = 1e-5
    for pos in (0, len(adapter.heads) - 1):
        layer, head = adapter.heads[pos]
        up, down = (torch.ones(adapter.heads_per_layer[layer], dtype=torch.float64) for _ in range(2))
        up[head], down[head] = 1 + eps, 1 - eps
        (f_up, b_up), (f_down, b_down) = (gains_at(adapter, (images, no_bg, no_fg), {layer: g}) for g in (up, down))
        torch.testing.assert_close(got.grad_big[pos].double(), (b_up - b_down) / (2 * eps), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.grad_fig[pos].double(), (f_up - f_down) / (2 * eps), rtol=1e-4, atol=1e-9)


def test_screen_terms_are_the_derivatives_of_each_score_term():
    rng = np.random.default_rng(0)
    big, fig = rng.uniform(0, 0.5, 6), rng.uniform(0, 0.5, 6)
    big[0] = fig[0] = 0.0  # BIR undefined: its term counts as 0
    gb, gf = rng.normal(0, 0.1, (4, 6)), rng.normal(0, 0.1, (4, 6))
    t = screen_terms(gb, gf, big, fig)
    np.testing.assert_array_equal(t["big_drop"], gb)
    np.testing.assert_allclose(t["big_minus_fig"], gb - gf)
    eps = 1e-6  # BIR(g) with BIG, FIG moving along their derivatives
    numeric = (bir(fig + eps * gf, big + eps * gb) - bir(fig - eps * gf, big - eps * gb)) / (2 * eps)
    np.testing.assert_allclose(t["bir_drop"][:, 1:], numeric[:, 1:], rtol=1e-5, atol=1e-9)
    assert (t["bir_drop"][:, 0] == 0).all()
    assert set(screen_terms(gb)) == {"big_drop"}


def test_fidelity_spearman_and_recall_at_k_2k_4k():
    exact = np.arange(20, dtype=float)[::-1]  # head 0 best
    assert fidelity(exact, exact, 3) == {"spearman": 1.0, "k": 3, "recall_k": 1.0, "recall_2k": 1.0, "recall_4k": 1.0}
    rev = fidelity(-exact, exact, 3)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["recall_k"] == 0.0 and rev["recall_4k"] == 0.0
    est = exact.copy()
    est[[0, 1, 2, 3, 4, 5]] = est[[5, 4, 3, 2, 1, 0]] - 100  # 0..2 fall below 3..5 but stay above the rest? no: all fall
    est = np.array([5, 9, 20, 19, 18, 17, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8, -9], float)
    f = fidelity(est, exact, 2)  # exact top 2: heads 0, 1; screen's order: 2, 3, 4, 5, 1, 0, ...
    assert f["recall_k"] == 0.0 and f["recall_2k"] == 0.0 and f["recall_4k"] == 1.0
    np.testing.assert_array_equal(average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        fidelity(np.zeros(3), np.zeros(4), 1)
