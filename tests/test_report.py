"""`cigma-ray report`: the page and its PNGs from a real tiny run, rendered by a headless Chromium."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cigma_ray.cli import main
from cigma_ray.config import Config
from cigma_ray.models import ModelSpec
from cigma_ray.method import head_scores
from cigma_ray.method.scores import resampled_means
from cigma_ray.report_html import spearman, split_half, top_k_probability

from helpers import finished_run

SMALL = Config(tp_ratio=0.3, mask_steps=4, mask_batch=4, unit_images=3, bootstrap=200, top_k=3, batch_size=8)


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, image_folder, tiny_checkpoint):
    """A finished tiny run with a prune table and a sweep plot in eval/, then its report."""
    out = str(tmp_path_factory.mktemp("report") / "run")
    finished_run(out, image_folder, tiny_checkpoint, SMALL)
    os.makedirs(os.path.join(out, "eval"))
    pq.write_table(pa.table({"removed": ["none", "top 3"], "accuracy": [0.875, 0.5]}),
                   os.path.join(out, "eval", "prune-k3.parquet"))
    Image.new("RGB", (40, 30), (10, 200, 30)).save(os.path.join(out, "eval", "sweep.png"))
    assert main(["report", out, "--images", "3"]) == 0
    return out


def page_images(html: str) -> list[Image.Image]:
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    prefix = "data:image/png;base64,"
    assert sources and all(s.startswith(prefix) for s in sources), "every image is embedded as a PNG data URI"
    images = []
    for s in sources:
        img = Image.open(io.BytesIO(base64.b64decode(s[len(prefix):])))
        img.load()
        assert img.format == "PNG" and min(img.size) > 0
        images.append(img)
    return images


def test_page_embeds_every_plot_and_writes_the_pngs(reported_run):
    folder = os.path.join(reported_run, "report")
    html = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
    images = page_images(html)
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert {"heatmap.png", "top-heads.png", "stability.png", "saliency.png", "sweep.png"} <= set(pngs)
    assert any(f.startswith("image-") for f in pngs)
    assert len(images) == len(pngs)
    for heading in ("Scores by layer and head", "Top 3 heads", "Stability of the top 3", "Images of D",
                    "Saliency before and after pruning", "Pruning", "Trade-off curves: sweep over K", "Automatic K",
                    "The same heads by the other scores"):
        assert f">{heading}" in html
    assert "prune-k3.parquet" in html and "0.875" in html  # the eval table, rendered
    assert "Spearman" in html


def test_page_renders_in_headless_chromium(reported_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    shot = tmp_path / "shot.png"
    page = "file://" + os.path.abspath(os.path.join(reported_run, "report", "index.html"))
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000", page],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    # the page without its images renders in about 200 colours (text and table rules); plots and photos add thousands
    assert colours > 2000 and pixels.std() > 20, f"screenshot looks blank or image-less ({colours} colours)"


def test_report_without_rankings_is_a_clear_error(reported_run, tmp_path, capsys):
    unranked = tmp_path / "unranked"
    unranked.mkdir()
    shutil.copy(os.path.join(reported_run, "run.json"), unranked / "run.json")
    assert main(["report", str(unranked)]) == 2
    assert "no rankings.parquet" in capsys.readouterr().err


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


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg", "deit_distilled", "vit_avg"])
def test_rollout_equals_the_one_from_timms_own_attention(kind):
    """The hook recomputes attention from `attn.qkv`; timm's unfused path exposes the real one."""
    import torch

    from cigma_ray.models import load
    from cigma_ray.report_html import attention_rollout

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
