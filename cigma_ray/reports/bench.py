"""`cigma-ray bench` results as text and a figure: rates, the issue's ratios beside their targets,
exactness and the bf16 check; throughput against batch size and model size."""
from __future__ import annotations

from pathlib import Path

RATIO_LABELS = {"engine_over_forward": "engine / forward", "engine_over_paper_loop": "engine / paper loop",
                "masks_over_bound": "masks / bound", "fig_cost": "scan with FIG^(-h)"}

def bench_figure(result: dict, path: str | Path) -> None:
    """Left: throughput against batch size per model. Right: best rates against model size."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(12, 5), layout="constrained")
    by_batch, by_size = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(len(result["models"]))]
    for m, color in zip(result["models"], colors):
        fwd, eng = m["forward"]["points"], m["engine"]["points"]
        by_batch.plot([p["batch_size"] for p in fwd], [p["images_per_s"] for p in fwd], "o-", color=color,
                      label=f"{m['model']}: forward (images/s)")
        by_batch.plot([p["batch_size"] for p in eng], [p["pairs_per_s"] for p in eng], "s--", color=color,
                      label=f"{m['model']}: engine scan (pairs/s)")
        by_batch.plot([m["paper_loop"]["batch_size"]], [m["paper_loop"]["pairs_per_s"]], "x", color=color,
                      markersize=10, mew=2, label=f"{m['model']}: paper-style loop (pairs/s)")
    by_batch.set(xscale="log", yscale="log", xlabel="batch size (images per forward)", ylabel="throughput per second",
                 title="throughput against batch size")
    by_batch.set_xticks(result["settings"]["batch_sizes"], [str(b) for b in result["settings"]["batch_sizes"]])
    by_batch.set_xticks([], minor=True)
    by_batch.grid(True, which="both", alpha=0.3)

    models = sorted(result["models"], key=lambda m: m["params_millions"])
    size = [m["params_millions"] for m in models]
    series = [("forward, best batch (images/s)", "o-", [m["forward"]["best_images_per_s"] for m in models]),
              ("engine scan, best batch (pairs/s)", "s--", [m["engine"]["best_pairs_per_s"] for m in models]),
              ("paper-style loop (pairs/s)", "x:", [m["paper_loop"]["pairs_per_s"] for m in models]),
              ("mask steps (images x steps/s)", "^-.", [m["masks"]["image_steps_per_s"] for m in models]),
              ("mask bound: forward / 3", "v:", [m["forward"]["best_images_per_s"] / 3 for m in models])]
    for label, style, values in series:
        by_size.plot(size, values, style, label=label)
    for m in models:
        by_size.annotate(m["model"], (m["params_millions"], m["forward"]["best_images_per_s"]),
                         textcoords="offset points", xytext=(4, 6), fontsize=8)
    by_size.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="throughput per second",
                title="best rates against model size")
    by_size.grid(True, which="both", alpha=0.3)
    for axes in (by_batch, by_size):
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for axis in (by_batch.yaxis, by_size.xaxis, by_size.yaxis):  # plain numbers (60, not 6 x 10^1), between decades too
        axis.set_major_formatter(LogFormatter())
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    v = result["machine"]
    fig.suptitle(f"cigma-ray bench: {result['device_name']} ({result['device']}), {result['precision']}, "
                 f"{result['date'][:10]}\ntorch {v['torch']}, timm {v['timm']}, ray {v['ray']}, numpy {v['numpy']}, "
                 f"python {v['python']}; random weights, input {'x'.join(map(str, result['models'][0]['input_size']))}",
                 fontsize=10)
    fig.savefig(path, dpi=110)


def curve(points: list[dict], key: str) -> str:
    return ", ".join(f"{p['batch_size']}: {p[key]:,.1f}" for p in points)


def per_seed(seeds: list[dict], key: str) -> str:
    return " ".join("-" if s[key] is None else f"{s[key]:.2f}" for s in seeds)


def bench_text(result: dict) -> str:
    """The table `cigma-ray bench` prints: rates, the issue's ratios beside their targets, exactness, bf16."""
    v = result["machine"]
    lines = [f"cigma-ray bench on {result['device_name']} ({result['device']}, {v['torch_threads']} threads), "
             f"{result['precision']}, {result['date'][:10]}",
             f"torch {v['torch']}, timm {v['timm']}, ray {v['ray']}, numpy {v['numpy']}, python {v['python']}"]
    for m in result["models"]:
        fwd, eng, loop, masks = m["forward"], m["engine"], m["paper_loop"], m["masks"]
        lines += [
            "",
            f"{m['model']} (random weights, {m['params_millions']:.1f}M parameters, {m['heads']} heads, input "
            f"{'x'.join(map(str, m['input_size']))}), {m['images']} images, best of {result['settings']['repeats']}",
            f"  forward            {fwd['best_images_per_s']:12,.1f} images/s  at batch {fwd['best_batch_size']} "
            f"(by batch: {curve(fwd['points'], 'images_per_s')})",
            f"  paper-style loop   {loop['pairs_per_s']:12,.1f} pairs/s   weights zeroed, whole model twice per "
            f"head and image, batch {loop['batch_size']}",
            f"  engine scan        {eng['best_pairs_per_s']:12,.1f} pairs/s   at batch {eng['best_batch_size']} "
            f"(by batch: {curve(eng['points'], 'pairs_per_s')})",
            f"  masks              {masks['masks_per_s']:12,.2f} masks/s   at {masks['steps']} steps, "
            f"{masks['images']} together; steps only: {masks['steps_only_masks_per_s']:,.2f}, bound "
            f"{masks['bound_masks_per_s']:,.2f} = forward best / (3 x {masks['steps']})",
            "  ratio                  measured  target",
        ]
        for name, label in RATIO_LABELS.items():
            target = m["targets"].get(name)
            verdict = f">= {target['target']:<4}  {'PASS' if target['pass'] else 'MISS'}" if target else "-"
            lines.append(f"  {label:<22}{m['ratios'][name]:8.2f}x  {verdict}")
        lines.append(f"  max |engine - loop|, fp32 ({m['exactness_images']} images x {m['heads']} heads): "
                     f"{m['max_abs_engine_minus_loop_fp32']:.1e}")
        top = m["bf16_top_k"]
        if top is not None:
            seeds = top["seeds"]
            lines.append(f"  bf16 vs fp32 top-{top['k']} heads ({len(seeds)} image seeds x {top['images']} images): "
                         f"overlap {per_seed(seeds, 'overlap')} (mean {top['mean_overlap']:.2f}, set changed in "
                         f"{top['changed']}/{len(seeds)}); Spearman {per_seed(seeds, 'spearman')}; "
                         f"Kendall {per_seed(seeds, 'kendall')}")
    return "\n".join(lines)


def adaptive_bench_text(r: dict) -> str:
    """`bench adaptive`: the replay as scanned and on resamples of D, forwards against the exhaustive scan."""
    lines = [f"run       {r['run']}: {r['model']}, {r['heads']} heads, D = {r['images']} images, {r['views']} ablated "
             f"forwards per (head, image) pair",
             f"adaptive  score {r['score']}, K = {r['k']}, delta = {r['delta']}, order {r['order']}, rounds from "
             f"{r['first']} images x{r['growth']}, bet cap {r['bet_cap']}",
             f"scores    K-th {r['kth_score']:+.5f}, (K+1)-th {r['next_score']:+.5f}, median {r['median_score']:+.5f}; "
             f"per-image spread of the terms (std over D, median over heads) {r['term_spread']:.5f}",
             f"{'D':>14} {'images':>7} {'rounds':>6} {'ablated forwards':>17} {'exhaustive':>12} {'saving':>7}  top-K set"]
    for row in r["rows"]:
        label = "as scanned" if row["scale"] == "D" else f"{row['scale']}x resample"
        lines.append(f"{label:>14} {row['images']:>7} {row['rounds']:>6} {row['forwards']:>17,} "
                     f"{row['exhaustive_forwards']:>12,} {row['saving']:>6.2f}x  {'same' if row['matched'] else 'DIFFERENT':>9}")
    if "screen_forwards" in r["rows"][0]:
        lines.append("with the pre-screen's cost (a forward and a backward, about 3 forwards, per view and image): "
                     + ", ".join(f"{row['saving_with_screen']:.2f}x at {row['images']}" for row in r["rows"]))
    matched = sum(row["matched"] for row in r["rows"])
    lines.append(f"top-K set equal to the exhaustive one in {matched}/{len(r['rows'])} replays; as scanned, "
                 f"{r['decided_in']} heads were decided in and {r['decided_out']} out before D was exhausted, "
                 f"every head measured first on the {r['rows'][0]['heavy']} images of D with the largest bounds "
                 f"on its term ({r['seconds']:.1f} s of replays)")
    lines.append("(resamples draw D's images with replacement at that multiple of its size: the saving grows with N "
                 "because the images a decision needs do not)")
    return "\n".join(lines)
