"""Reports (reports/): `show` names the scores, and the HTML page embeds every plot and renders in a browser."""
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

from helpers import cli, finished_run

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


def test_show_names_the_score_and_the_others(scored_run):
    shown = cli("show", scored_run).stdout
    assert "top 2 heads by bir_drop: mean over D of BIR_i - BIR_i^(-h)" in shown
    assert "big_drop (rank)" in shown and "big_minus_fig (rank)" in shown
    ranking = pq.read_table(os.path.join(scored_run, "rankings.parquet"))
    assert ranking["rank"].to_pylist() == ranking["bir_drop_rank"].to_pylist()
    again = cli("show", scored_run, "--score", "big_drop").stdout
    assert "top 2 heads by big_drop" in again
    bad = cli("show", scored_run, "--score", "fig", check=False)
    assert bad.returncode == 2 and "can rank by big_drop, bir_drop, big_minus_fig" in bad.stderr


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
