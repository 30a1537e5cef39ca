"""`cigma-ray report`: one self-contained HTML page (PNG plots embedded, also saved beside it).

What a reader needs to judge a ranking: the scores of every head, the top K with intervals, how
stable the top K is under resampling D, what the masks and counterfactuals look like, how the
predictions and the attention change when the top K is removed, and the pruning results. It
draws what the run's files and evaluation.inspection hold; it computes nothing itself.
"""
from __future__ import annotations

import base64
import html
import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import torch

from ..evaluation.inspection import ImagePanel, Stability
from ..method import SCORES
from ..rundir import Run, RunDir
from .run import adaptive_note, run_summary

REPORT_DIR = "report"


# -- figures ------------------------------------------------------------------------------------

def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmap_figure(rankings: pa.Table, heads_per_layer: list[int], top: list[tuple[int, int]], score: str) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = np.full((len(heads_per_layer), max(heads_per_layer)), np.nan)
    for r in rankings.to_pylist():
        grid[r["layer"], r["head"]] = r["score"]
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * grid.shape[1], 1.0 + 0.4 * grid.shape[0]))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for layer, head in top:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    fig.colorbar(image, ax=ax, label=f"score: {score}")
    ax.set_title(f"scores; the top {len(top)} heads outlined")
    return png(fig)


def intervals_figure(rows: list[dict], ci_level: float, score_name: str, interval: str | None = None) -> bytes:
    import matplotlib.pyplot as plt

    labels = [f"{r['layer']}.{r['head']}" for r in rows]
    score = np.array([r["score"] for r in rows])
    low = np.array([r["ci_low"] for r in rows], dtype=np.float64)
    high = np.array([r["ci_high"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.3 * len(rows)))
    y = np.arange(len(rows))
    errors = np.nan_to_num(np.stack([score - low, high - score]).clip(min=0))
    ax.errorbar(score, y, xerr=errors, fmt="o", color="#b2182b", ecolor="#555", capsize=3)
    ax.axvline(0, color="#999", linewidth=1)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_ylabel("head (layer.head)")
    ax.set_xlabel(f"{score_name} with its {interval or f'{ci_level:.0%} bootstrap interval'}")
    return png(fig)


def stability_figure(heads: list[tuple[int, int]], prob: np.ndarray, half_a: np.ndarray, half_b: np.ndarray,
                     k: int) -> bytes:
    import matplotlib.pyplot as plt

    shown = [i for i in np.argsort(-prob, kind="stable") if prob[i] > 0][:max(2 * k, 1)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.9 + max(3.0, 0.3 * len(shown))),
                                      gridspec_kw={"width_ratios": [1.3, 1]})
    left.barh(np.arange(len(shown)), prob[shown], color="#2166ac")
    left.set_yticks(np.arange(len(shown)), [f"{heads[i][0]}.{heads[i][1]}" for i in shown])
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel(f"P(in the top {k}) over bootstrap resamples of D")
    left.set_ylabel("head (layer.head)")
    right.scatter(half_a, half_b, s=14, color="#4d4d4d")
    both = np.r_[half_a, half_b]
    span = [float(both.min()), float(both.max())] if len(both) else [0.0, 1.0]
    right.plot(span, span, color="#bbb", linewidth=1)
    right.set_xlabel("score from half A of D")
    right.set_ylabel("score from half B of D")
    right.set_title("split-half scores, one point per head")
    fig.tight_layout()
    return png(fig)


def panel_figure(p: ImagePanel, k: int) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(13, 3.0))
    views = [(p.shown, f"image {p.image_id} (label {p.label})", None),
             (p.mask, "learned mask M", "viridis"),
             (p.fg, "foreground S", "gray"),
             (p.no_bg, "background removed", None),
             (p.no_fg, "foreground removed", None)]
    for ax, (img, title, cmap) in zip(axes, views):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"prediction: {p.before[0]} ({p.before[1]:.2f}) intact; "
                 f"{p.after[0]} ({p.after[1]:.2f}) with the top {k} heads removed", fontsize=10, y=1.04)
    return png(fig)


def saliency_figure(panels: list[ImagePanel], k: int) -> bytes:
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    fig, axes = plt.subplots(len(panels), 3, figsize=(8, 2.7 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels):
        height, width = p.shown.shape[:2]
        row[0].imshow(p.shown, interpolation="nearest")
        row[0].set_title(f"image {p.image_id}", fontsize=10)
        for ax, grid, title in zip(row[1:], p.saliency, ("intact", f"top {k} heads removed")):
            up = F.interpolate(torch.from_numpy(grid)[None, None].float(), size=(height, width), mode="bilinear",
                               align_corners=False)[0, 0].numpy()
            ax.imshow(p.shown, interpolation="nearest")
            span = max(float(up.max() - up.min()), 1e-12)
            ax.imshow((up - up.min()) / span, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f"rollout, {title}", fontsize=10)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return png(fig)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
p.note { color: #555; } code { background: #f4f4f4; padding: 0 0.2em; }
"""


def cell(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(cell(v) for v in value)
    return "" if value is None else str(value)


def html_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or (list(rows[0]) if rows else [])
    def align(v) -> str:
        return "" if isinstance(v, (int, float)) and not isinstance(v, bool) else ' class="l"'
    head = "".join(f"<th{align(rows[0][c]) if rows else ''}>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td{align(r[c])}>{html.escape(cell(r[c]))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Page:
    """The HTML being built; each plot goes into it as a data URI and beside it as a PNG file."""

    def __init__(self, run: RunDir):
        self.run = run
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{text}</p>')

    def image(self, name: str, data: bytes, alt: str) -> None:
        self.run.write_bytes(f"{REPORT_DIR}/{name}", data)
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        self.add(f'<img src="{uri}" alt="{html.escape(alt)}" title="{html.escape(name)}">')

    def html(self, title: str) -> str:
        return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{STYLE}</style></head><body>\n" + "\n".join(self.parts) + "\n</body></html>\n")


def summary_section(page: Page, run: Run, k: int) -> None:
    meta = run.meta
    rows = [line.split(None, 1) for line in run_summary(run.dir).splitlines()]
    cfg = meta["config"]
    rows.append(["config", f"score {cfg.get('score', 'big_drop')}, ablation {cfg.get('ablation', 'zero')}, "
                 f"measure_fig {cfg.get('measure_fig', False)}, measure_swap {cfg.get('measure_swap', False)}, "
                 f"top_k {cfg['top_k']} (shown: top {k}), bootstrap {cfg['bootstrap']}, ci_level "
                 f"{cfg['ci_level']}, tp_ratio {cfg['tp_ratio']}, seed {cfg['seed']}, rounds {cfg.get('rounds', 1)}"
                 + (f", adaptive (delta {cfg['delta']}, order {cfg.get('adaptive_order', 'none')})"
                    if cfg.get("adaptive") else "")])
    page.add("<table>" + "".join(f'<tr><th class="l">{html.escape(a)}</th><td class="l">{html.escape(b)}</td></tr>'
                                 for a, b in rows) + "</table>")


def stability_section(page: Page, run: Run, s: Stability) -> None:
    k, heads, prob, n = s.k, s.heads, s.probability, s.images
    if run.rounds > 1:
        page.note("This run is iterative; the numbers here are from its first scan (every head, intact model).")
    if n < 2:
        page.note(f"D has {n} image; split-half correlation needs at least 2.")
    page.add(f"<p>Over {s.resamples} bootstrap resamples of the {n} images of D (the resamples of the "
             f"intervals), the share in which each head is among the top {k}. Split-half: the images of D are cut "
             f"into two disjoint seeded halves of {n // 2}; the Spearman rank correlation of the heads' "
             f"scores from the two halves is <b>{cell(s.spearman) or 'undefined'}</b> (1: the same order from either half).</p>")
    page.image("stability.png", stability_figure(heads, prob, s.half_a, s.half_b, k), "top-K probability and split-half scores")
    shown = [i for i in np.argsort(-prob, kind="stable") if prob[i] > 0][:2 * k]
    page.add(html_table([{"head": f"{heads[i][0]}.{heads[i][1]}", f"P(top {k})": float(prob[i]),
                          "score (half A)": float(s.half_a[i]), "score (half B)": float(s.half_b[i])} for i in shown]))


def images_sections(page: Page, panels: list[ImagePanel], k: int) -> None:
    page.add("<h2>Images of D: masks and counterfactuals</h2>")
    page.add(f"<p>{len(panels)} images of D, spread over its image ids: the image, its learned soft mask M, the "
             "foreground S (the kept cells), the two counterfactuals (background or foreground replaced by the "
             f"image's mean), and the predicted class with its probability before and after removing the top {k} heads.</p>")
    for p in panels:
        page.image(f"image-{p.image_id}.png", panel_figure(p, k), f"image {p.image_id}")
    page.add(html_table([{"image": p.image_id, "label": p.label, "intact": p.before[0], "p intact": p.before[1],
                          f"top {k} removed": p.after[0], "p removed": p.after[1]} for p in panels]))
    page.add("<h2>Saliency before and after pruning</h2>")
    if panels[0].saliency is None:
        page.note("Saliency is not available for this model (attention rollout needs a timm VisionTransformer).")
        return
    page.add("<p>Attention rollout: the product over layers of 0.5 &middot; (mean attention of the kept heads) + "
             "0.5 &middot; I, read from the read-out token(s), scaled to its range (dark: least attended, bright: "
             "most). Removed heads are left out of the mean; the attention itself is that of the pruned model.</p>")
    page.image("saliency.png", saliency_figure(panels, k), "attention rollout before and after pruning")


def pruning_section(page: Page, run: RunDir) -> None:
    names = run.list("eval")
    pruned = [n for n in names if n.startswith("prune-k")]
    for name in pruned:
        page.add(f"<h3>{html.escape(name)}</h3>")
        page.add(html_table(run.read_table(f"eval/{name}").to_pylist()))
        collapse_note(page, run.read_table(f"eval/{name}").to_pylist())
    if not pruned:
        page.note(f"No pruning results yet: <code>cigma-ray prune {html.escape(run.url)}</code> makes them.")
    page.add("<h3>Trade-off curves: sweep over K</h3>")
    if run.exists("eval/sweep.png"):
        page.add("<p>Accuracy, counterfactual conflict accuracy and mean BIR against K, for the top K by each score, "
                 "K random heads and the K lowest-scored, and (right) clean accuracy against counterfactual conflict "
                 "accuracy for every score and K. A black cross marks a pruning that collapsed the model.</p>")
        page.image("sweep.png", run.read_bytes("eval/sweep.png"), "sweep over K")
    if "sweep.parquet" in names:
        rows = run.read_table("eval/sweep.parquet").to_pylist()
        collapse_note(page, rows)
        trade_off_section(page, rows)
        page.add("<h4>Every metric</h4>")
        page.add(html_table(rows))
    else:
        page.note(f"No sweep yet: <code>cigma-ray sweep {html.escape(run.url)} --k 0,1,2,4,8</code> makes it.")
    page.add("<h3>Automatic K</h3>")
    if run.exists("eval/auto-k.json"):
        choice = json.loads(run.read_bytes("eval/auto-k.json"))
        page.add(f"<p>{html.escape(choice['reason'])}</p>")
        rows = run.read_table("eval/auto-k.parquet").to_pylist()
        collapse_note(page, rows)
        columns = ["control", "seed", "k", "heads", "accuracy", "accuracy_low", "accuracy_high", "conflict_accuracy",
                   "conflict_accuracy_low", "conflict_accuracy_high", "bir_mean", "bir_mean_low", "bir_mean_high",
                   "gain", "gain_low", "gain_high", "fig", "big", "collapsed", "verdict"]
        page.add(html_table(rows, [c for c in columns if c in rows[0]]))
    else:
        page.note(f"Not chosen yet: <code>cigma-ray prune {html.escape(run.url)} --auto-k</code> picks the score and "
                  "K on held-out images under a clean-accuracy guard.")


def interval(r: dict, metric: str) -> str:
    value, low, high = r.get(metric), r.get(f"{metric}_low"), r.get(f"{metric}_high")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if low is None or (isinstance(low, float) and np.isnan(low)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def trade_off_section(page: Page, rows: list[dict]) -> None:
    """The whole trade-off, per eval set: clean accuracy against counterfactual conflict accuracy and BIR, with
    intervals, for every score and K (random heads: mean [min, max] over the draws)."""
    page.add("<h4>The trade-off: clean accuracy against counterfactual conflict accuracy</h4>")
    page.add("<p>Counterfactual conflict accuracy: each masked image's foreground over the backgrounds of images of "
             "other classes, judged against its own label: a conflicting split made from the eval set itself. A "
             "pruning that removes the shortcut raises it without costing clean accuracy; random heads are the "
             "control. Intervals: bootstrap over images.</p>")
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        table = []
        for k in sorted({r["k"] for r in group}):
            for control in dict.fromkeys(r["control"] for r in group if r["k"] == k):
                draws = [r for r in group if r["k"] == k and r["control"] == control]
                if control == "random":
                    cells = {m: f"{np.mean([r[m] for r in draws]):.3f} [{min(r[m] for r in draws):.3f}, "
                                f"{max(r[m] for r in draws):.3f}]" for m in ("accuracy", "conflict_accuracy", "bir_mean")}
                else:
                    cells = {m: interval(draws[0], m) for m in ("accuracy", "conflict_accuracy", "bir_mean")}
                label = "none" if control == "intact" else (f"{k} random (mean of {len(draws)})" if control == "random"
                                                            else f"top {k} by {control}" if control != "lowest"
                                                            else f"{k} lowest-scored")
                table.append({"heads removed": label, "heads": draws[0]["heads"] if control not in ("random",) else "",
                              "clean accuracy": cells["accuracy"], "conflict accuracy (swap)": cells["conflict_accuracy"],
                              "BIR (mean)": cells["bir_mean"], "collapsed": any(r["collapsed"] for r in draws)})
        page.add(f"<p><b>{html.escape(name)}</b></p>")
        page.add(html_table(table))


def collapse_note(page: Page, rows: list[dict]) -> None:
    """Say in words which prunings collapsed the model (accuracy at chance, FIG and BIG near zero)."""
    gone = [r for r in rows if r.get("collapsed")]
    if gone:
        named = ", ".join(dict.fromkeys(f"{r.get('set', '')} K={r['k']} {r['control']}".strip() for r in gone))
        page.add(f"<p><b>Collapsed:</b> {html.escape(named)}: accuracy at chance and FIG, BIG near zero; the pruned "
                 "model no longer uses the image, so its low BIR is not a fix for the shortcut.</p>")


def write_report(run: Run, k: int, stability: Stability | None, panels: list[ImagePanel] | None) -> str:
    """Build RUN/report/index.html and its PNGs from the run's files and what evaluation.inspection
    computed (`panels` None: no per-image sections); returns the page's path or URL."""
    import matplotlib

    matplotlib.use("Agg")
    meta = run.meta
    heads_per_layer = run.heads_per_layer
    score = run.score
    rankings = run.rankings()
    top = run.top_heads(k)

    run.dir.remove(REPORT_DIR)  # a page of an earlier report must not leave its images behind
    page = Page(run.dir)
    title = f"cigma-ray report: {meta['model']['name']}"
    page.add(f"<h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(run.url)}</p>")
    summary_section(page, run, k)

    page.add("<h2>Scores by layer and head</h2>")
    page.add(f"<p>The heads are ranked by <b>{html.escape(score)}</b>: the mean over D of "
             f"{html.escape(SCORES[score])}. Red: removing the head lowers it (the head carries background "
             "evidence); blue: it raises it.</p>")
    page.image("heatmap.png", heatmap_figure(rankings, heads_per_layer, top, score), "layer x head heatmap of scores")

    rows = rankings.sort_by("rank").slice(0, k).to_pylist()
    level = meta["config"]["ci_level"]
    page.add(f"<h2>Top {k} heads</h2>")
    interval = (f"deciding interval (adaptive scan, jointly {1 - meta['config']['delta']:.0%})" if run.adaptive
                else None)
    page.image("top-heads.png", intervals_figure(rows, level, score, interval), f"top {k} heads with intervals")
    columns = ["rank", "layer", "head", "score", "stderr", "ci_low", "ci_high", "n"] + (["round"] if "round" in rows[0] else [])
    if run.adaptive:
        columns += ["in_top_k", "decided_early", "decided_round"]
        page.note(html.escape(adaptive_note(run)))
    page.add(html_table(rows, columns))
    others = [s for s in run.scores if s != score]
    if others:
        page.add(f"<h3>The same heads by the other scores</h3><p>Each cell: the score, its {level:.0%} bootstrap "
                 "interval and the head's rank by it. "
                 + "; ".join(f"<b>{html.escape(o)}</b>: {html.escape(SCORES[o])}" for o in others)
                 + ". A head that every prediction needs lowers FIG and BIG together: big_drop rewards it, the "
                 "others do not.</p>")
        page.add(html_table([{"layer": r["layer"], "head": r["head"],
                              **{o: f"{r[o]:+.4g} [{r[o + '_ci_low']:+.3g}, {r[o + '_ci_high']:+.3g}] rank {r[o + '_rank']}"
                                 for o in [score, *others]}} for r in rows]))

    page.add(f"<h2>Stability of the top {k}</h2>")
    if stability is None:
        page.note("This run is an adaptive scan: heads outside the top K were measured on part of D, so there is "
                  "no full (heads x images) matrix to resample. Its top-K set carries the adaptive scan's guarantee "
                  "instead (above); an exhaustive scan of the same data gives these measures.")
    else:
        stability_section(page, run, stability)

    if panels:
        images_sections(page, panels, k)

    page.add("<h2>Pruning</h2>")
    pruning_section(page, run.dir)

    run.dir.write_bytes(f"{REPORT_DIR}/index.html", page.html(title).encode())
    return run.dir.path(REPORT_DIR, "index.html") if run.dir.local else posixpath.join(run.url, REPORT_DIR, "index.html")
