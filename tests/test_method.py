"""Pure math (method/): JS, masks, counterfactuals, gains and BIR, scores, metrics, the bootstrap and stability, each against its definition by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cigma_ray.method import (
    accuracy,
    baseline,
    bir,
    bir_statistics,
    bir_summary,
    bootstrap,
    counterfactuals,
    ece,
    foreground_cells,
    gains,
    head_scores,
    js,
    kl,
    nll,
    optimise_masks,
    prediction_statistics,
    probs,
    ranks,
    resampled_means,
    score_terms,
    spearman,
    split_half,
    top_k_probability,
)
from cigma_ray.method.masks import mask_loss, total_variation

LN2 = math.log(2.0)


def np_js(p, q, eps=1e-12):
    """Reference JS in float64 numpy, natural log, clamped at eps inside the logs."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def _kl(a, b):
        return (a * (np.log(np.maximum(a, eps)) - np.log(np.maximum(b, eps)))).sum(-1)

    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rand_dist(gen, *shape, peaked=1.0, dtype=torch.float64):
    return torch.softmax(peaked * torch.randn(*shape, generator=gen, dtype=torch.float64), -1).to(dtype)


def _expected_topk_lowest_index(mask_np, k):
    """Independent reference: rank cells by (-value, flat index) and keep the first k."""
    n = mask_np.shape[0]
    flat = mask_np.reshape(n, -1)
    out = np.zeros_like(flat, dtype=bool)
    for i in range(n):
        order = sorted(range(flat.shape[1]), key=lambda j: (-flat[i, j], j))
        out[i, order[:k]] = True
    return out.reshape(mask_np.shape)


def _tiny_conv_model(seed=0, classes=5):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(64, classes),
    ).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _images(seed, n=4, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_js_symmetric():
    g = torch.Generator().manual_seed(0)
    p, q = rand_dist(g, 20, 7), rand_dist(g, 20, 7)
    torch.testing.assert_close(js(p, q), js(q, p), rtol=0, atol=1e-15)


def test_js_zero_for_identical():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        p = rand_dist(g, 10, 5, peaked=3.0, dtype=dtype)
        out = js(p, p.clone())
        assert torch.all(out == 0), out
    # with exact zeros too
    p = torch.tensor([0.0, 1.0, 0.0])
    assert js(p, p).item() == 0.0


def test_js_bounded_by_ln2_and_nonnegative():
    g = torch.Generator().manual_seed(2)
    for peaked in (0.5, 3.0, 30.0):
        p, q = rand_dist(g, 500, 6, peaked=peaked), rand_dist(g, 500, 6, peaked=peaked)
        out = js(p, q)
        assert torch.all(out >= -1e-12)
        assert torch.all(out <= LN2 + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_js_disjoint_supports_is_ln2(dtype):
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.0, 0.8]], dtype=dtype)
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7], [0.6, 0.0, 0.4, 0.0]], dtype=dtype)
    out = js(p, q)
    assert torch.all(torch.isfinite(out))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(out.double().numpy(), [LN2] * 3, rtol=0, atol=tol)


def test_js_natural_log_hand_value():
    # p = [1, 0], q = [1/2, 1/2], m = [3/4, 1/4]
    # KL(p||m) = ln(4/3); KL(q||m) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); JS = 3/4 ln(4/3)
    p = torch.tensor([1.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected = 0.75 * math.log(4.0 / 3.0)
    assert js(p, q).item() == pytest.approx(expected, abs=1e-14)
    # a log-2 (bits) implementation would give expected / ln 2
    assert abs(js(p, q).item() - expected / LN2) > 0.05


def test_js_matches_numpy_random():
    g = torch.Generator().manual_seed(3)
    p, q = rand_dist(g, 8, 11, peaked=2.0), rand_dist(g, 8, 11, peaked=2.0)
    np.testing.assert_allclose(js(p, q).numpy(), np_js(p.numpy(), q.numpy()), rtol=1e-12, atol=1e-15)
    # float32 too
    np.testing.assert_allclose(js(p.float(), q.float()).double().numpy(), np_js(p.numpy(), q.numpy()),
                               rtol=1e-5, atol=1e-7)


def test_js_exact_zeros_finite_and_matches_0log0_convention():
    p = torch.tensor([0.7, 0.3, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.1, 0.4, 0.5], dtype=torch.float64)
    out = js(p, q).item()
    assert math.isfinite(out)
    # hand: m = [0.35, 0.2, 0.2, 0.25]; zeros contribute nothing (0 log 0 = 0)
    m = [0.35, 0.2, 0.2, 0.25]
    kl_pm = 0.7 * math.log(0.7 / m[0]) + 0.3 * math.log(0.3 / m[1])
    kl_qm = 0.1 * math.log(0.1 / m[1]) + 0.4 * math.log(0.4 / m[2]) + 0.5 * math.log(0.5 / m[3])
    assert out == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-14)


def test_kl_clamps_inside_logs():
    # q is exactly 0 where p > 0: the clamp at 1e-12 makes the log finite
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = kl(p, q).item()
    expected = 0.5 * math.log(0.5 / 1.0) + 0.5 * (math.log(0.5) - math.log(1e-12))
    assert math.isfinite(out)
    assert out == pytest.approx(expected, rel=1e-12)
    # p == 0 entries contribute exactly 0 even where q == 0
    assert kl(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).item() == 0.0


def test_js_batched_over_leading_dims():
    g = torch.Generator().manual_seed(4)
    p, q = rand_dist(g, 2, 3, 4, 5), rand_dist(g, 2, 3, 4, 5)
    out = js(p, q)
    assert out.shape == (2, 3, 4)
    ref = np.empty((2, 3, 4))
    for i in range(2):
        for j in range(3):
            for k in range(4):
                ref[i, j, k] = np_js(p[i, j, k].numpy(), q[i, j, k].numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_js_low_precision_inputs_computed_in_fp32(low):
    g = torch.Generator().manual_seed(5)
    p = rand_dist(g, 16, 10, peaked=2.0).to(low)
    q = rand_dist(g, 16, 10, peaked=2.0).to(low)
    out = js(p, q)
    assert out.dtype == torch.float32
    # reference: the exact low-precision values, upcast, JS in float64
    ref = np_js(p.double().numpy(), q.double().numpy())
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-7)
    # mixed precision pair also goes through fp32
    out_mixed = js(p, q.float())
    assert out_mixed.dtype == torch.float32
    np.testing.assert_allclose(out_mixed.double().numpy(), ref, rtol=1e-5, atol=1e-7)


def test_js_float64_stays_float64():
    p = torch.tensor([0.2, 0.8], dtype=torch.float64)
    q = torch.tensor([0.6, 0.4], dtype=torch.float64)
    assert js(p, q).dtype == torch.float64


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0, 3.7])
def test_probs_is_softmax_of_logits_over_tau(tau):
    g = torch.Generator().manual_seed(6)
    logits = 4 * torch.randn(5, 9, generator=g)
    out = probs(logits, tau)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), np_softmax(logits.double().numpy() / tau), rtol=1e-5, atol=1e-7)


def test_probs_default_tau_is_one_and_bf16_goes_fp32():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(probs(logits).numpy(), np_softmax([[1.0, 2.0, 3.0]]), rtol=1e-6)
    lb = torch.tensor([[0.5, -1.25, 2.0]], dtype=torch.bfloat16)  # exactly representable
    out = probs(lb, 0.5)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), np_softmax(np.array([[0.5, -1.25, 2.0]]) / 0.5), rtol=1e-6)


def test_foreground_default_count_is_358_of_1024():
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(3, 32, 32, generator=g)
    fg = foreground_cells(mask, 0.35)
    assert fg.shape == (3, 32, 32)
    assert fg.dtype == torch.bool
    assert fg.reshape(3, -1).sum(1).tolist() == [358, 358, 358]


def test_foreground_random_masks_keep_largest():
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(4, 32, 32, generator=g)
    fg = foreground_cells(mask, 0.35)
    m = mask.numpy()
    for i in range(4):
        kept, dropped = m[i][fg[i].numpy()], m[i][~fg[i].numpy()]
        assert kept.size == 358
        assert kept.min() > dropped.max()
        # exactly the 358 largest values
        np.testing.assert_array_equal(np.sort(kept), np.sort(m[i].ravel())[-358:])
    np.testing.assert_array_equal(fg.numpy(), _expected_topk_lowest_index(m, 358))


def test_foreground_constant_masks_lowest_flat_indices_win():
    for value in (0.5, 0.0, 1.0):
        mask = torch.full((2, 32, 32), value)
        fg = foreground_cells(mask, 0.35).reshape(2, -1).numpy()
        expected = np.zeros(1024, dtype=bool)
        expected[:358] = True
        for i in range(2):
            np.testing.assert_array_equal(fg[i], expected)


def test_foreground_partial_ties():
    rng = np.random.default_rng(9)
    n = 3
    mask = np.empty((n, 1024), dtype=np.float32)
    for i in range(n):
        perm = rng.permutation(1024)
        mask[i, perm[:300]] = 0.9          # certainly kept
        mask[i, perm[300:500]] = 0.5       # tie group straddling the cut: 58 of 200 kept
        mask[i, perm[500:]] = rng.uniform(0.0, 0.4, size=524)
    fg = foreground_cells(torch.from_numpy(mask.reshape(n, 32, 32)), 0.35).reshape(n, -1).numpy()
    for i in range(n):
        assert fg[i].sum() == 358
        assert fg[i][mask[i] == 0.9].all()
        assert not fg[i][mask[i] < 0.45].any()
        tie_idx = np.flatnonzero(mask[i] == 0.5)  # ascending flat indices
        np.testing.assert_array_equal(np.flatnonzero(fg[i] & (mask[i] == 0.5)), tie_idx[:58])
    np.testing.assert_array_equal(fg, _expected_topk_lowest_index(mask, 358).reshape(n, -1))


@pytest.mark.parametrize("h,w,ratio,k", [(4, 4, 0.25, 4), (8, 8, 0.1, 6), (5, 7, 0.3, 10), (32, 32, 0.5, 512),
                                         (32, 32, 1.0, 1024), (32, 32, 0.0, 0)])
def test_foreground_counts_other_shapes(h, w, ratio, k):
    g = torch.Generator().manual_seed(10)
    mask = torch.rand(2, h, w, generator=g)
    mask[1] = 0.25  # one all-ties mask
    fg = foreground_cells(mask, ratio)
    assert fg.reshape(2, -1).sum(1).tolist() == [k, k]
    np.testing.assert_array_equal(fg.numpy(), _expected_topk_lowest_index(mask.numpy(), k))


def test_baseline_per_image_per_channel_mean():
    g = torch.Generator().manual_seed(11)
    images = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    b = baseline(images)
    assert b.shape == (3, 4, 1, 1)
    x = images.numpy()
    for i in range(3):
        for c in range(4):
            assert b[i, c, 0, 0].item() == pytest.approx(float(np.sum(x[i, c]) / 30.0), abs=1e-13)


@pytest.mark.parametrize("size", [64, 224])
def test_counterfactuals_pixel_values(size):
    g = torch.Generator().manual_seed(12 + size)
    n, c = 2, 3
    images = torch.randn(n, c, size, size, generator=g, dtype=torch.float64) + torch.arange(c).view(1, c, 1, 1)
    fg = torch.rand(n, 32, 32, generator=g) > 0.6
    no_bg, no_fg = counterfactuals(images, fg)
    assert no_bg.shape == images.shape and no_fg.shape == images.shape

    x = images.numpy()
    b = x.reshape(n, c, -1).mean(-1)  # (n, c)
    f = size // 32
    s = np.kron(fg.numpy().astype(np.float64), np.ones((f, f)))  # nearest upsampling, (n, size, size)
    s = s[:, None]
    np.testing.assert_allclose(no_bg.numpy(), s * x + (1 - s) * b[:, :, None, None], rtol=0, atol=1e-12)
    np.testing.assert_allclose(no_fg.numpy(), (1 - s) * x + s * b[:, :, None, None], rtol=0, atol=1e-12)

    # explicit pixels: pixel (y, x) belongs to cell (y // f, x // f)
    fgn = fg.numpy()
    for (i, ch, y, xx) in [(0, 0, 0, 0), (0, 1, f - 1, f), (1, 2, size - 1, size - 1), (1, 0, 5 * f + f // 2, 17 * f),
                           (0, 2, 31 * f, 0), (1, 1, 13 * f + f - 1, 29 * f + 1)]:
        inside = fgn[i, y // f, xx // f]
        want_bg = x[i, ch, y, xx] if inside else b[i, ch]
        want_fg = b[i, ch] if inside else x[i, ch, y, xx]
        assert no_bg[i, ch, y, xx].item() == pytest.approx(want_bg, abs=1e-12)
        assert no_fg[i, ch, y, xx].item() == pytest.approx(want_fg, abs=1e-12)

    # the two counterfactuals sum to I + B
    np.testing.assert_allclose((no_bg + no_fg).numpy(), x + b[:, :, None, None], rtol=0, atol=1e-12)


def test_counterfactuals_all_or_nothing():
    g = torch.Generator().manual_seed(13)
    images = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)
    b = images.numpy().mean(axis=(2, 3), keepdims=True)
    all_fg = torch.ones(1, 32, 32, dtype=torch.bool)
    no_bg, no_fg = counterfactuals(images, all_fg)
    np.testing.assert_allclose(no_bg.numpy(), images.numpy(), atol=1e-12)
    np.testing.assert_allclose(no_fg.numpy(), np.broadcast_to(b, images.shape), atol=1e-12)


def test_total_variation_by_hand():
    m = torch.tensor([[[0.0, 1.0, 0.5],
                       [0.2, 0.2, 0.9]],
                      [[0.3, 0.3, 0.3],
                       [0.3, 0.3, 0.3]]], dtype=torch.float64)
    # mask 0: |dx| = 1.0, 0.5, 0.0, 0.7 -> mean 2.2/4 = 0.55; |dy| = 0.2, 0.8, 0.4 -> mean 1.4/3
    expected0 = 2.2 / 4 + 1.4 / 3
    tv = total_variation(m)
    assert tv.shape == (2,)
    assert tv[0].item() == pytest.approx(expected0, abs=1e-14)
    assert tv[1].item() == 0.0


def test_total_variation_random_vs_numpy():
    rng = np.random.default_rng(14)
    m = rng.random((3, 6, 9))
    ref = [np.abs(np.diff(mi, axis=1)).mean() + np.abs(np.diff(mi, axis=0)).mean() for mi in m]
    np.testing.assert_allclose(total_variation(torch.from_numpy(m)).numpy(), ref, rtol=1e-12)


def test_mask_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    q_keep = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]],
                         [[0.5, 0.5], [0.5, 0.1]]], dtype=torch.float64)
    l_js, l_1, l_tv = 2.0, 0.1, 0.3
    # image 0: JS = 3/4 ln(4/3); mean M = 0.75; TV = mean(|1|,|0|) + mean(|1|,|0|) = 0.5 + 0.5 = 1.0
    e0 = l_js * 0.75 * math.log(4 / 3) + l_1 * 0.75 + l_tv * 1.0
    # image 1: JS = 0; mean M = 1.6/4 = 0.4; TV = mean(0, 0.4) + mean(0, 0.4) = 0.2 + 0.2 = 0.4
    e1 = l_js * 0.0 + l_1 * 0.4 + l_tv * 0.4
    out = mask_loss(q, q_keep, mask, l_js, l_1, l_tv)
    assert out.shape == (2,)
    np.testing.assert_allclose(out.numpy(), [e0, e1], rtol=1e-12, atol=1e-15)


def test_optimise_masks_batched_equals_one_at_a_time():
    model = _tiny_conv_model(0)
    images = _images(15)
    kw = dict(mask_size=8, mask_steps=20, mask_lr=0.05)
    with torch.no_grad():
        q = probs(model(images))
    batched = optimise_masks(model, images, q, **kw)
    assert batched.shape == (4, 8, 8)
    assert batched.dtype == torch.float32
    single = torch.cat([optimise_masks(model, images[i:i + 1], q[i:i + 1], **kw) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # and the masks actually moved away from the initial 0.5
    assert (batched - 0.5).abs().max() > 1e-2


def test_optimise_masks_zero_steps_is_half():
    model = _tiny_conv_model(1)
    images = _images(16, n=3)
    with torch.no_grad():
        q = probs(model(images))
    m = optimise_masks(model, images, q, mask_size=32, mask_steps=0)
    assert m.shape == (3, 32, 32)
    assert m.dtype == torch.float32
    assert torch.all(m == 0.5)


def test_optimise_masks_default_mask_size_is_32():
    model = _tiny_conv_model(1)
    images = _images(16, n=2)
    with torch.no_grad():
        q = probs(model(images))
    assert optimise_masks(model, images, q, mask_steps=0).shape == (2, 32, 32)


def test_optimise_masks_in_open_unit_interval():
    model = _tiny_conv_model(2)
    images = _images(17, n=3)
    with torch.no_grad():
        q = probs(model(images))
    m = optimise_masks(model, images, q, mask_size=8, mask_steps=20, mask_lr=0.2)
    assert torch.all(m > 0) and torch.all(m < 1)
    assert torch.all(torch.isfinite(m))


def test_optimise_masks_one_adam_step_on_l1_only():
    # With l_js = l_tv = 0 the only gradient is d(l_1 * mean(sigmoid(theta)))/dtheta = l_1 * 1/4 / cells
    # at theta = 0. Adam's first (bias-corrected) step is lr * g / (|g| + 1e-8) downwards, per cell.
    images = _images(18, n=2)

    def logits_fn(x):
        return x.mean(dim=(1, 2, 3)).unsqueeze(-1).repeat(1, 3) * torch.tensor([1.0, -1.0, 0.5])

    with torch.no_grad():
        q = probs(logits_fn(images))
    s, lr, l_1 = 8, 0.05, 0.01
    m = optimise_masks(logits_fn, images, q, mask_size=s, mask_lr=lr, mask_steps=1, l_js=0.0, l_1=l_1, l_tv=0.0)
    g = l_1 * 0.25 / (s * s)
    theta = -lr * g / (g + 1e-8)
    expected = 1.0 / (1.0 + math.exp(-theta))
    torch.testing.assert_close(m, torch.full((2, s, s), expected), rtol=0, atol=1e-6)


def test_optimise_masks_left_half_model_keeps_left_half():
    # The model's evidence is the horizontal contrast energy of the left half only: the blend
    # B + U(M)(I - B) scales that contrast by ~M, so the class-0 logit grows with the left-half
    # mask, and nothing depends on the right half (beyond cell 4 touching pixel 7 through bilinear
    # upsampling).
    size = 16
    images = _images(20, n=3, size=size)

    def energy(x):
        left = x[..., :, : size // 2]
        return (left[..., :, 1:] - left[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))

    scale = 6.0 / energy(images).mean().item()

    def left_only(x):
        e = scale * energy(x) - 2.0
        return torch.stack([e, torch.zeros_like(e)], dim=-1)

    with torch.no_grad():
        q = probs(left_only(images))
    assert torch.all(q[:, 0] > 0.9)
    m = optimise_masks(left_only, images, q, mask_size=8, mask_steps=80, mask_lr=0.05)
    left, right = m[:, :, :4], m[:, :, 4:]
    for i in range(3):
        assert left[i].mean() > right[i].mean() + 0.1, (left[i].mean(), right[i].mean())
        assert left[i].mean() > 0.6
    # Without TV (which drags the right half towards the high left half), the far-right cells feel
    # only the sparsity term and fall well below the 0.5 start while the left half stays high.
    m0 = optimise_masks(left_only, images, q, mask_size=8, mask_steps=80, mask_lr=0.05, l_tv=0.0)
    for i in range(3):
        assert m0[i, :, 5:].max() < 0.2
        assert m0[i, :, :4].min() > 0.6


def test_gains_fig_big_bir():
    g = torch.Generator().manual_seed(21)
    q = rand_dist(g, 6, 7, peaked=2.0)
    q_no_fg = rand_dist(g, 6, 7, peaked=2.0)
    q_no_bg = rand_dist(g, 6, 7, peaked=2.0)
    fig, big = gains(q, q_no_fg, q_no_bg)
    ref_fig = np_js(q.numpy(), q_no_fg.numpy())
    ref_big = np_js(q.numpy(), q_no_bg.numpy())
    np.testing.assert_allclose(fig.numpy(), ref_fig, rtol=1e-12)
    np.testing.assert_allclose(big.numpy(), ref_big, rtol=1e-12)
    np.testing.assert_allclose(bir(fig.numpy(), big.numpy()), ref_big / (ref_fig + ref_big), rtol=1e-12)


def test_gains_bir_nan_when_both_zero_and_edge_values():
    q = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    q_no_fg = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    q_no_bg = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    fig, big = gains(q, q_no_fg, q_no_bg)
    assert fig[0].item() == 0.0 and big[0].item() == 0.0
    ratio = bir(fig.numpy(), big.numpy())
    assert math.isnan(ratio[0])
    assert ratio[1] == 1.0   # background only
    assert ratio[2] == 0.0   # foreground only
    # float32 too, in float32
    ratio32 = bir(*(g.numpy() for g in gains(q.float(), q_no_fg.float(), q_no_bg.float())))
    assert ratio32.dtype == np.float32
    assert math.isnan(ratio32[0]) and ratio32[1] == 1.0 and ratio32[2] == 0.0


def test_bir_summary_by_hand():
    fig = [1.0, 3.0, 0.0, 2.0]
    big = [1.0, 1.0, 0.0, 6.0]
    out = bir_summary(fig, big)
    # image 2 is ignored; per-image BIR: 1/2, 1/4, 3/4 -> mean 1/2
    assert out["bir_mean"] == pytest.approx(0.5, abs=1e-15)
    # ratio of means: (8/3) / (6/3 + 8/3) = 4/7
    assert out["bir_ratio"] == pytest.approx(4 / 7, abs=1e-15)
    assert out["n"] == 3


def test_bir_summary_mean_of_ratios_differs_from_ratio_of_means_and_empty():
    out = bir_summary(np.array([0.0, 9.0]), np.array([1.0, 1.0]))
    # per image: 1, 0.1 -> mean 0.55; ratio of means: 1 / (4.5 + 1) = 2/11
    assert out["bir_mean"] == pytest.approx(0.55)
    assert out["bir_ratio"] == pytest.approx(2 / 11)
    empty = bir_summary([0.0, 0.0], [0.0, 0.0])
    assert math.isnan(empty["bir_mean"]) and math.isnan(empty["bir_ratio"]) and empty["n"] == 0


def test_head_scores_mean_and_stderr_by_hand():
    deltas = np.array([[1.0, 2.0, 3.0, 6.0],
                       [0.5, -0.5, 0.5, -0.5]])
    out = head_scores(deltas, bootstrap=0)
    # row 0: mean 3; sample var = (4 + 1 + 0 + 9) / 3 = 14/3; stderr = sqrt(14/3)/2
    # row 1: mean 0; sample var = 4 * 0.25 / 3 = 1/3; stderr = sqrt(1/3)/2
    np.testing.assert_allclose(out["score"], [3.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(out["stderr"], [math.sqrt(14 / 3) / 2, math.sqrt(1 / 3) / 2], rtol=1e-14)
    assert list(out["n"]) == [4, 4]
    assert np.all(np.isnan(out["ci_low"])) and np.all(np.isnan(out["ci_high"]))
    assert out["ci_low"].shape == (2,) and out["ci_high"].shape == (2,)


def test_head_scores_bootstrap_reproducible_and_seeded():
    rng = np.random.default_rng(22)
    deltas = rng.normal(0.1, 1.0, size=(5, 40))
    a = head_scores(deltas, bootstrap=300, seed=0)
    b = head_scores(deltas, bootstrap=300, seed=0)
    c = head_scores(deltas, bootstrap=300, seed=1)
    np.testing.assert_array_equal(a["ci_low"], b["ci_low"])
    np.testing.assert_array_equal(a["ci_high"], b["ci_high"])
    assert not np.array_equal(a["ci_low"], c["ci_low"])
    assert not np.array_equal(a["ci_high"], c["ci_high"])
    for r in (a, c):
        assert np.all(r["ci_low"] <= r["score"]) and np.all(r["score"] <= r["ci_high"])
        assert np.all(r["ci_low"] < r["ci_high"])


def test_head_scores_bootstrap_width_close_to_normal_interval():
    rng = np.random.default_rng(23)
    deltas = rng.normal(0.0, 2.0, size=(3, 400))
    out = head_scores(deltas, bootstrap=2000, ci_level=0.95, seed=0)
    width = out["ci_high"] - out["ci_low"]
    normal = 2 * 1.959964 * out["stderr"]
    np.testing.assert_allclose(width, normal, rtol=0.15)
    narrow = head_scores(deltas, bootstrap=2000, ci_level=0.5, seed=0)
    assert np.all(narrow["ci_high"] - narrow["ci_low"] < width)


def test_head_scores_bootstrap_shares_resamples_across_heads():
    # the same image resamples for every head: a shifted copy of a row gets the shifted interval
    rng = np.random.default_rng(24)
    row = rng.normal(size=30)
    deltas = np.stack([row, row + 5.0, 3.0 * row])
    out = head_scores(deltas, bootstrap=500, seed=3)
    np.testing.assert_allclose(out["ci_low"][1], out["ci_low"][0] + 5.0, atol=1e-12)
    np.testing.assert_allclose(out["ci_high"][1], out["ci_high"][0] + 5.0, atol=1e-12)
    np.testing.assert_allclose(out["ci_low"][2], 3.0 * out["ci_low"][0], atol=1e-12)
    np.testing.assert_allclose(out["ci_high"][2], 3.0 * out["ci_high"][0], atol=1e-12)


def test_head_scores_constant_row_degenerate_interval():
    deltas = np.vstack([np.full(7, 0.1), np.linspace(-1, 1, 7)])
    out = head_scores(deltas, bootstrap=200, seed=0)
    assert out["stderr"][0] == pytest.approx(0.0, abs=1e-15)  # np.std of a constant row: ~1e-18 rounding
    assert out["score"][0] == pytest.approx(0.1, abs=1e-15)
    assert out["ci_low"][0] == pytest.approx(0.1, abs=1e-15) and out["ci_high"][0] == pytest.approx(0.1, abs=1e-15)
    assert out["ci_low"][1] < out["ci_high"][1]


@pytest.mark.parametrize("n_images", [1, 7, 300])
def test_head_scores_bootstrap_equals_resampling_images_by_hand(n_images):
    """The count-weighted matrix product is the plain definition: draw n images with replacement, average."""
    deltas = np.random.default_rng(5).normal(size=(4, n_images))
    out = head_scores(deltas, bootstrap=250, ci_level=0.9, seed=11)
    rng = np.random.default_rng(11)
    means = np.stack([deltas[:, rng.integers(0, n_images, size=n_images)].mean(axis=1) for _ in range(250)])
    np.testing.assert_allclose(out["ci_low"], np.quantile(means, 0.05, axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["ci_high"], np.quantile(means, 0.95, axis=0), rtol=0, atol=1e-12)


def test_ranks_descending_one_based_ties_in_input_order():
    score = np.array([0.1, 0.5, 0.5, -1.0, 0.3, 0.5])
    # order: idx1 (0.5), idx2 (0.5), idx5 (0.5), idx4 (0.3), idx0 (0.1), idx3 (-1)
    np.testing.assert_array_equal(ranks(score), [5, 1, 2, 6, 4, 3])
    np.testing.assert_array_equal(ranks(np.zeros(4)), [1, 2, 3, 4])
    assert ranks(np.array([2.0])).tolist() == [1]


def test_accuracy():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    labels = np.array([0, 2, 2, 1])
    assert accuracy(p, labels) == 0.5


def test_nll_by_hand():
    p = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    # -ln 0.7, -ln 0.2, -ln 0.5, -ln(1e-12) (clamped)
    expected = (-math.log(0.7) - math.log(0.2) - math.log(0.5) - math.log(1e-12)) / 4
    assert nll(p, labels) == pytest.approx(expected, rel=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    rows, labels = [], []
    # confidence 0.75 (bin 11): 4 samples, 3 correct
    for k in range(4):
        rows.append([0.75, 0.25, 0.0])
        labels.append(0 if k < 3 else 1)
    # confidence 0.9 (bin 13): 10 samples, 9 correct
    for k in range(10):
        rows.append([0.1, 0.9, 0.0])
        labels.append(1 if k < 9 else 0)
    # confidence 0.6 (bin 8): 5 samples, 3 correct
    for k in range(5):
        rows.append([0.3, 0.1, 0.6])
        labels.append([2, 2, 2, 0, 1][k])
    # confidence 1.0 (bin 14): 2 samples, both correct
    for k in range(2):
        rows.append([0.0, 0.0, 1.0])
        labels.append(2)
    p, labels = np.array(rows), np.array(labels)
    assert ece(p, labels) == pytest.approx(0.0, abs=1e-12)
    assert accuracy(p, labels) == pytest.approx(17 / 21)
    # sanity: flipping one label breaks calibration (bin 13 becomes 8/10 accurate: 10/21 * 0.1)
    labels2 = labels.copy()
    labels2[4] = 0
    assert ece(p, labels2) == pytest.approx(10 / 21 * 0.1, abs=1e-12)


def test_ece_by_hand_15_bins():
    # confidences and the bins (width 1/15) they fall in:
    #   0.95 -> bin 14, 0.97 -> bin 14, 0.62 -> bin 9 (0.6, 0.6667], 0.65 -> bin 9, 0.30 -> bin 4 (0.2667, 0.3333]
    p = np.array([
        [0.95, 0.03, 0.01, 0.01],   # correct
        [0.01, 0.97, 0.01, 0.01],   # wrong (label 0)
        [0.62, 0.18, 0.10, 0.10],   # correct
        [0.10, 0.10, 0.65, 0.15],   # wrong (label 3)
        [0.25, 0.30, 0.25, 0.20],   # correct
    ])
    labels = np.array([0, 0, 0, 3, 1])
    bin14 = 2 / 5 * abs(0.5 - (0.95 + 0.97) / 2)
    bin9 = 2 / 5 * abs(0.5 - (0.62 + 0.65) / 2)
    bin4 = 1 / 5 * abs(1.0 - 0.30)
    expected = bin14 + bin9 + bin4
    assert ece(p, labels) == pytest.approx(expected, abs=1e-12)
    # default is 15 bins: a single bin would pool everything and give another value
    pooled = abs(3 / 5 - (0.95 + 0.97 + 0.62 + 0.65 + 0.30) / 5)
    assert abs(expected - pooled) > 0.01
    assert ece(p, labels, bins=1) == pytest.approx(pooled, abs=1e-12)
    assert ece(p, labels, bins=15) == pytest.approx(expected, abs=1e-12)


def test_ece_confidence_one_goes_to_last_bin():
    # A: confidence 1.0, wrong (gap -1); B: confidence 0.94 (bin 14), right (gap +0.06).
    # Both in the last bin: |0.5 - 0.97| = 0.47. (Separate bins would give 0.53; dropping A, 0.03.)
    p = np.array([[1.0, 0.0], [0.94, 0.06]])
    labels = np.array([1, 0])
    assert ece(p, labels) == pytest.approx(0.47, abs=1e-12)


def test_score_terms_match_their_definitions_by_hand():
    big, fig = np.array([0.2, 0.1, 0.0]), np.array([0.2, 0.3, 0.0])
    big_abl, fig_abl = np.array([[0.1, 0.1, 0.0], [0.0, 0.05, 0.1]]), np.array([[0.1, 0.1, 0.0], [0.0, 0.15, 0.1]])
    t = score_terms(big, big_abl, fig, fig_abl)
    np.testing.assert_allclose(t["big_drop"], [[0.1, 0.0, 0.0], [0.2, 0.05, -0.1]])
    # BIR 0.5, 0.25, undefined; ablated: 0.5, 0.5, undefined / undefined, 0.25, 0.5 -> undefined pairs count as 0
    np.testing.assert_allclose(t["bir_drop"], [[0.0, 0.25 - 0.5, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(t["big_minus_fig"], [[0.0, -0.2, 0.0], [0.0, -0.1, 0.0]])
    assert set(score_terms(big, big_abl)) == {"big_drop"}


def test_metric_statistics_on_hand_made_cases():
    # perfectly calibrated: confidence 0.75 with 3 of 4 right, 0.9 with 9 of 10, 1.0 with 2 of 2
    p = np.array([[0.75, 0.25]] * 4 + [[0.1, 0.9]] * 10 + [[1.0, 0.0]] * 2)
    labels = np.array([0, 0, 0, 1] + [1] * 9 + [0] + [0, 0])
    stats = prediction_statistics(p, labels)
    ones = np.ones((1, len(p)))
    assert stats["ece"](ones)[0] == pytest.approx(0.0, abs=1e-12)
    assert stats["accuracy"](ones)[0] == pytest.approx(14 / 16)
    expected_nll = -(3 * math.log(0.75) + math.log(0.25) + 9 * math.log(0.9) + math.log(0.1) + 2 * math.log(1.0)) / 16
    assert stats["nll"](ones)[0] == pytest.approx(expected_nll, rel=1e-12)
    # a probability of 0 for the label is clamped at 1e-12, as `nll` does
    assert prediction_statistics(np.array([[1.0, 0.0]]), np.array([1]))["nll"](np.ones((1, 1)))[0] == pytest.approx(
        -math.log(1e-12))

    # a row of counts is the metric on the images repeated that often
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(4) * 0.5, size=30)
    y = rng.integers(0, 4, size=30)
    counts = rng.integers(0, 4, size=(3, 30)).astype(float)
    stats = prediction_statistics(q, y)
    for row in counts:
        idx = np.repeat(np.arange(30), row.astype(int))
        for name, plain in (("accuracy", accuracy), ("nll", nll), ("ece", ece)):
            assert stats[name](row[None])[0] == pytest.approx(plain(q[idx], y[idx]), abs=1e-12)

    fig, big = rng.uniform(0, 0.5, 20), rng.uniform(0, 0.5, 20)
    fig[3] = big[3] = 0.0  # depends on neither: left out, as bir_summary does
    expected = bir_summary(fig, big)
    got = {name: f(np.ones((1, 20)))[0] for name, f in bir_statistics(fig, big).items()}
    assert got["bir_mean"] == pytest.approx(expected["bir_mean"]) and got["bir_ratio"] == pytest.approx(expected["bir_ratio"])
    assert all(math.isnan(f(np.ones((1, 2)))[0]) for f in bir_statistics(np.zeros(2), np.zeros(2)).values())


def test_bootstrap_intervals_contain_the_point_and_are_seeded():
    rng = np.random.default_rng(1)
    q = rng.dirichlet(np.ones(3), size=50)
    y = rng.integers(0, 3, size=50)
    stats = {**prediction_statistics(q, y), **bir_statistics(rng.uniform(0, 1, 50), rng.uniform(0, 1, 50))}
    a = bootstrap(stats, 50, 500, 0.95, seed=3)
    assert a == bootstrap(stats, 50, 500, 0.95, seed=3) and a != bootstrap(stats, 50, 500, 0.95, seed=4)
    for name in ("accuracy", "nll", "bir_mean", "bir_ratio"):  # means and ratios of means: the point lies inside
        point, low, high = a[name]
        assert low <= point <= high, name
    assert a["ece"][1] <= a["ece"][2]  # ECE is biased upwards under resampling: its point may lie below
    assert a["accuracy"][0] == accuracy(q, y)
    point, low, high = bootstrap(stats, 50, 0, 0.95, seed=3)["nll"]
    assert point == pytest.approx(nll(q, y)) and math.isnan(low) and math.isnan(high)


def test_stability_statistics():
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(6, 40))
    deltas[4] += 5.0  # one head far ahead of the rest
    prob = top_k_probability(deltas, k=2, resamples=100, seed=0)
    assert prob[4] == 1.0 and prob.sum() == pytest.approx(2.0)
    means = np.concatenate(list(resampled_means(deltas, 100, seed=0)))  # the very resamples of the intervals
    np.testing.assert_allclose(np.quantile(means, 0.025, axis=0), head_scores(deltas, bootstrap=100, seed=0)["ci_low"])
    a, b = split_half(deltas, seed=0)
    assert a.shape == b.shape == (6,) and not np.allclose(a, b)
    x = np.array([3.0, 1.0, 2.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(np.sqrt(3) / 2)
