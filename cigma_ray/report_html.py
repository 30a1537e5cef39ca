"""`cigma-ray report RUN`: one self-contained HTML page (PNG plots embedded, also saved beside it).

What a reader needs to judge a ranking: the scores of every head, the top K with intervals, how
stable the top K is under resampling D, what the masks and counterfactuals look like, how the
predictions and the attention change when the top K is removed, and the pruning results.
Everything is read from the run directory; only the per-image panels rebuild the model and data.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .config import Config, ConfigError, resolve_k
from .data import DataError, open_source
from .engine import Replica
from .method import SCORES, counterfactuals, probs
from .method.scores import resampled_means
from .models import LoadedModel
from .pipeline import load_scanned
from .storage import RunDir, StorageError

REPORT_DIR = "report"


def add_report_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="an HTML page with PNG plots of a run: scores, intervals, stability, "
                              "per-image masks and counterfactuals, saliency before and after pruning",
                              description="Writes RUN/report/index.html (images embedded, so the file stands alone) "
                              "and the same plots as PNG files beside it.")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=int, help="heads in the top K (default: the run's top_k)")
    p.add_argument("--images", type=int, default=4, help="images of D shown with their masks (default 4)")
    p.add_argument("--device", default="cpu", help="device for the per-image panels (default cpu)")
    p.add_argument("--checkpoint", help="the scanned weights, when the file has moved since the scan")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .cli import check_device, open_run

    run = open_run(args.run)
    if args.images < 0:
        raise ConfigError(f"--images {args.images}: give a count of 0 or more")
    page = write_report(run, k=args.k, n_images=args.images, device=check_device(args.device),
                        checkpoint=args.checkpoint)
    print(f"report: {page}")
    return 0


# -- rebuilding what the run scanned ---------------------------------------------------------------

def open_scanned_data(meta: dict):
    source = open_source(meta["data"]["url"])
    if source.fingerprint() != meta["data"]["fingerprint"]:
        raise DataError(f"{meta['data']['url']} lists other images than when the run scanned it, so image ids no "
                        "longer match; restore the data set to report on this run")
    return source


# -- statistics of the ranking -------------------------------------------------------------------

def top_k_probability(deltas: np.ndarray, k: int, resamples: int, seed: int) -> np.ndarray:
    """Per head, the fraction of bootstrap resamples of D in which it is among the K best scores."""
    hits = np.zeros(deltas.shape[0])
    for means in resampled_means(deltas, resamples, seed):
        best = np.argsort(-means, axis=1, kind="stable")[:, :k]
        hits += np.bincount(best.reshape(-1), minlength=deltas.shape[0])
    return hits / resamples


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (what Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def split_half(deltas: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores from two disjoint seeded halves of D (an odd image out is left out)."""
    n = deltas.shape[1]
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return deltas[:, order[:half]].mean(axis=1), deltas[:, order[half:2 * half]].mean(axis=1)


def first_round_deltas(run: RunDir, meta: dict, image_ids: list[int]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The (heads, images) matrix of the run's score's terms in its first scan (every head, the intact model)."""
    from .pipeline import score_matrices, scan_units

    cfg = Config(**meta["config"])
    heads_per_layer = meta["plan"]["heads_per_layer"]
    heads = [(layer, h) for layer, n in enumerate(heads_per_layer) for h in range(n)]
    return heads, score_matrices(run, scan_units(image_ids, cfg, heads_per_layer), heads, image_ids, [cfg.score])[cfg.score]


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


def intervals_figure(rows: list[dict], ci_level: float, score_name: str) -> bytes:
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
    ax.set_xlabel(f"{score_name} with its {ci_level:.0%} bootstrap interval")
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


# -- per-image panels and saliency ----------------------------------------------------------------

@dataclass
class ImagePanel:
    image_id: int
    label: str
    shown: np.ndarray  # (H, W, 3) in [0, 1]
    mask: np.ndarray  # (s, s) soft mask
    fg: np.ndarray  # (s, s) bool
    no_bg: np.ndarray
    no_fg: np.ndarray
    before: tuple[str, float]  # predicted class, its probability
    after: tuple[str, float]
    saliency: tuple[np.ndarray, np.ndarray] | None  # rollout (grid) intact, pruned


def displayable(images: torch.Tensor, model: torch.nn.Module) -> np.ndarray:
    """Preprocessed images back to RGB in [0, 1] with the model's own normalisation."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def attention_rollout(loaded: LoadedModel, images: torch.Tensor, keep: dict[int, torch.Tensor],
                      removed: list[tuple[int, int]]) -> np.ndarray | None:
    """Attention rollout of a timm ViT (None for other models): the product over layers of
    0.5 * (mean attention of the kept heads) + 0.5 * I, read from the read-out token(s), on the
    patch grid. The attention is recomputed from each block's `attn.qkv`, with `keep` applied."""
    from .models.timm_vit import TimmViTAdapter

    adapter = loaded.adapter
    model = adapter.model
    if not isinstance(adapter, TimmViTAdapter) or not all(hasattr(b.attn, "qkv") for b in model.blocks):
        return None
    gone = set(removed)
    attentions: list[torch.Tensor | None] = [None] * adapter.num_layers

    def capture(layer: int):
        def hook(attn, args):
            x = args[0]
            b, n, _ = x.shape
            q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(dim=-1)
            kept = [h for h in range(attn.num_heads) if (layer, h) not in gone]
            attentions[layer] = a[:, kept].mean(dim=1) if kept else None
        return hook

    hooks = [blk.attn.register_forward_pre_hook(capture(i)) for i, blk in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            adapter.logits(images, {layer: m.to(images.device).expand(len(images), -1) for layer, m in keep.items()})
    finally:
        for h in hooks:
            h.remove()
    n = next(a.shape[-1] for a in attentions if a is not None)
    rollout = torch.eye(n).expand(len(images), n, n)
    for a in attentions:
        if a is not None:  # a layer with every head removed passes the residual stream through
            rollout = (0.5 * a.float().cpu() + 0.5 * torch.eye(n)) @ rollout
    prefix = model.num_prefix_tokens
    if model.global_pool == "token":  # the class token (and DeiT's distillation token), never registers
        readout = rollout[:, :adapter.readout_rows or 1].mean(dim=1)
    else:  # pooled over the patches
        readout = rollout[:, prefix:].mean(dim=1)
    return readout[:, prefix:].reshape(len(images), *model.patch_embed.grid_size).numpy()


def class_name(classes: list[str], index: int) -> str:
    """Folder names when they are names; with integer folders the index itself is the class."""
    if all(c.isdigit() for c in classes) or index >= len(classes):
        return str(index)
    return classes[index]


def image_panels(run: RunDir, meta: dict, masks: pa.Table, removed: list[tuple[int, int]], n_images: int,
                 device: str, checkpoint: str | None) -> list[ImagePanel]:
    """`n_images` images spread evenly over D (by image id, so over the classes of an ImageFolder),
    with what the method made of them."""
    loaded = load_scanned(run.url, meta, device, checkpoint)
    source = open_scanned_data(meta)
    cfg = Config(**meta["config"])
    masks = masks.sort_by("image_id")
    masks = masks.take(np.unique(np.linspace(0, masks.num_rows - 1, min(n_images, masks.num_rows)).round().astype(int)))
    ids = masks["image_id"].to_pylist()
    images, ok, failed = source.load([source.records[i] for i in ids], loaded.transform)
    if failed:
        raise DataError(f"image {failed[0][0].path} of D cannot be read now ({failed[0][1]})")
    side = cfg.mask_size
    soft = np.stack(masks["mask"].to_numpy(zero_copy_only=False)).reshape(-1, side, side)
    fg = torch.from_numpy(np.stack(masks["fg"].to_numpy(zero_copy_only=False))).reshape(-1, side, side)
    no_bg, no_fg = counterfactuals(images, fg)
    replica = Replica(loaded, device, meta["precision"], cfg.batch_size)
    keep = replica.keep_without(removed)
    before, after = (probs(replica.logits(images, k), cfg.tau).numpy() for k in (None, keep))
    model = loaded.adapter.model
    on_device = images.to(device)
    rollouts = [attention_rollout(loaded, on_device, k, r) for k, r in (({}, []), (keep, removed))]
    classes = meta["data"]["classes"]
    shown, shown_no_bg, shown_no_fg = (displayable(x, model) for x in (images, no_bg, no_fg))

    def prediction(p: np.ndarray) -> tuple[str, float]:
        return class_name(classes, int(p.argmax())), float(p.max())

    return [ImagePanel(image_id=i, label=class_name(classes, r.label), shown=shown[j], mask=soft[j],
                       fg=fg[j].numpy(), no_bg=shown_no_bg[j], no_fg=shown_no_fg[j], before=prediction(before[j]),
                       after=prediction(after[j]),
                       saliency=None if rollouts[0] is None else (rollouts[0][j], rollouts[1][j]))
            for j, (i, r) in enumerate(zip(ids, ok))]


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


# -- the page -----------------------------------------------------------------------------------

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


def summary_section(page: Page, run: RunDir, meta: dict, k: int) -> None:
    from .report import run_summary

    rows = [line.split(None, 1) for line in run_summary(run).splitlines()]
    cfg = meta["config"]
    rows.append(["config", f"score {cfg.get('score', 'big_drop')}, measure_fig {cfg.get('measure_fig', False)}, "
                 f"top_k {cfg['top_k']} (shown: top {k}), bootstrap {cfg['bootstrap']}, ci_level "
                 f"{cfg['ci_level']}, tp_ratio {cfg['tp_ratio']}, seed {cfg['seed']}, rounds {cfg.get('rounds', 1)}"])
    page.add("<table>" + "".join(f'<tr><th class="l">{html.escape(a)}</th><td class="l">{html.escape(b)}</td></tr>'
                                 for a, b in rows) + "</table>")


def stability_section(page: Page, run: RunDir, meta: dict, image_ids: list[int], k: int) -> None:
    heads, deltas = first_round_deltas(run, meta, image_ids)
    cfg = meta["config"]
    resamples = cfg["bootstrap"] or 1000
    prob = top_k_probability(deltas, k, resamples, cfg["seed"])
    if cfg.get("rounds", 1) > 1:
        page.note("This run is iterative; the numbers here are from its first scan (every head, intact model).")
    if len(image_ids) < 2:
        page.note(f"D has {len(image_ids)} image; split-half correlation needs at least 2.")
        half_a = half_b = deltas.mean(axis=1)
        rho = float("nan")
    else:
        half_a, half_b = split_half(deltas, cfg["seed"])
        rho = spearman(half_a, half_b)
    page.add(f"<p>Over {resamples} bootstrap resamples of the {len(image_ids)} images of D (the resamples of the "
             f"intervals), the share in which each head is among the top {k}. Split-half: the images of D are cut "
             f"into two disjoint seeded halves of {len(image_ids) // 2}; the Spearman rank correlation of the heads' "
             f"scores from the two halves is <b>{cell(rho) or 'undefined'}</b> (1: the same order from either half).</p>")
    page.image("stability.png", stability_figure(heads, prob, half_a, half_b, k), "top-K probability and split-half scores")
    shown = [i for i in np.argsort(-prob, kind="stable") if prob[i] > 0][:2 * k]
    page.add(html_table([{"head": f"{heads[i][0]}.{heads[i][1]}", f"P(top {k})": float(prob[i]),
                          "score (half A)": float(half_a[i]), "score (half B)": float(half_b[i])} for i in shown]))


def images_sections(page: Page, run: RunDir, meta: dict, masks: pa.Table, removed: list[tuple[int, int]],
                    n_images: int, device: str, checkpoint: str | None, k: int) -> None:
    panels = image_panels(run, meta, masks, removed, n_images, device, checkpoint)
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
        page.add("<p>Accuracy and mean BIR against K, for the top K by each score, K random heads and the K "
                 "lowest-scored. A black cross marks a pruning that collapsed the model.</p>")
        page.image("sweep.png", run.read_bytes("eval/sweep.png"), "sweep over K")
    if "sweep.parquet" in names:
        rows = run.read_table("eval/sweep.parquet").to_pylist()
        collapse_note(page, rows)
        page.add(html_table(rows))
    else:
        page.note(f"No sweep yet: <code>cigma-ray sweep {html.escape(run.url)} --k 0,1,2,4,8</code> makes it.")
    page.add("<h3>Automatic K</h3>")
    if run.exists("eval/auto-k.json"):
        import json

        choice = json.loads(run.read_bytes("eval/auto-k.json"))
        page.add(f"<p>{html.escape(choice['reason'])}</p>")
        rows = run.read_table("eval/auto-k.parquet").to_pylist()
        collapse_note(page, rows)
        page.add(html_table(rows, ["control", "seed", "k", "heads", "accuracy", "accuracy_low", "accuracy_high",
                                   "bir_mean", "bir_mean_low", "bir_mean_high", "fig", "big", "collapsed", "verdict"]))
    else:
        page.note(f"Not chosen yet: <code>cigma-ray prune {html.escape(run.url)} --auto-k</code> picks the score and "
                  "K on held-out images under a clean-accuracy guard.")


def collapse_note(page: Page, rows: list[dict]) -> None:
    """Say in words which prunings collapsed the model (accuracy at chance, FIG and BIG near zero)."""
    gone = [r for r in rows if r.get("collapsed")]
    if gone:
        named = ", ".join(dict.fromkeys(f"{r.get('set', '')} K={r['k']} {r['control']}".strip() for r in gone))
        page.add(f"<p><b>Collapsed:</b> {html.escape(named)}: accuracy at chance and FIG, BIG near zero; the pruned "
                 "model no longer uses the image, so its low BIR is not a fix for the shortcut.</p>")


def write_report(run: RunDir, k: int | None = None, n_images: int = 4, device: str = "cpu",
                 checkpoint: str | None = None) -> str:
    """Build RUN/report/index.html and its PNGs; returns the page's path or URL."""
    import matplotlib

    matplotlib.use("Agg")
    from .prune import check_k, run_scores, top_heads

    if not run.exists("rankings.parquet"):
        raise StorageError(f"{run.url} has no rankings.parquet yet, so there is nothing to report; finish the run by "
                           f"running the scan command that made it again (`cigma-ray scan ... --out {run.url}`)")
    meta = run.read_json("run.json")
    heads_per_layer = meta["plan"]["heads_per_layer"]
    k = resolve_k(meta["config"]["top_k"], sum(heads_per_layer)) if k is None else k
    check_k(k, sum(heads_per_layer), "--k")
    score = meta["config"].get("score", "big_drop")
    rankings = run.read_table("rankings.parquet")
    top = top_heads(rankings, k)
    masks = run.read_folder("masks")
    image_ids = sorted(masks["image_id"].to_pylist())

    run.remove(REPORT_DIR)  # a page of an earlier report must not leave its images behind
    page = Page(run)
    title = f"cigma-ray report: {meta['model']['name']}"
    page.add(f"<h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(run.url)}</p>")
    summary_section(page, run, meta, k)

    page.add("<h2>Scores by layer and head</h2>")
    page.add(f"<p>The heads are ranked by <b>{html.escape(score)}</b>: the mean over D of "
             f"{html.escape(SCORES[score])}. Red: removing the head lowers it (the head carries background "
             "evidence); blue: it raises it.</p>")
    page.image("heatmap.png", heatmap_figure(rankings, heads_per_layer, top, score), "layer x head heatmap of scores")

    rows = rankings.sort_by("rank").slice(0, k).to_pylist()
    level = meta["config"]["ci_level"]
    page.add(f"<h2>Top {k} heads</h2>")
    page.image("top-heads.png", intervals_figure(rows, level, score), f"top {k} heads with intervals")
    columns = ["rank", "layer", "head", "score", "stderr", "ci_low", "ci_high", "n"] + (["round"] if "round" in rows[0] else [])
    page.add(html_table(rows, columns))
    others = [s for s in run_scores(meta) if s != score]
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
    stability_section(page, run, meta, image_ids, k)

    if n_images:
        images_sections(page, run, meta, masks, top, n_images, device, checkpoint, k)

    page.add("<h2>Pruning</h2>")
    pruning_section(page, run)

    run.write_bytes(f"{REPORT_DIR}/index.html", page.html(title).encode())
    return run.path(REPORT_DIR, "index.html") if run.local else posixpath.join(run.url, REPORT_DIR, "index.html")
