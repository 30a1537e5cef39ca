"""Pruning results as text and figures: prune and sweep tables with their controls, the auto-k
trade-off table, the demo's trade-off table, and the sweep's curves (eval/sweep.png)."""
from __future__ import annotations

import io

import numpy as np

from ..config import Config
from ..evaluation import AutoK, EvalSet
from ..method import SCORES
from ..rundir import Run, RunDir
from .tables import cell, format_table

COLUMNS = {"accuracy": "accuracy", "conflict_accuracy": "conflict acc. (swap)", "bir_mean": "BIR (mean)",
           "bir_ratio": "BIR (ratio)", "nll": "NLL", "ece": "ECE"}
CONTROL_NAMES = {"intact": "none", **{name: "top {k} by " + name for name in SCORES}, "random": "{k} random",
                 "lowest": "{k} lowest-scored"}
CONTROLS = tuple(CONTROL_NAMES)  # table order


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of one eval set: intact, then per K the top K by each score, random K (mean [min, max] over draws), lowest K."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        for control in CONTROLS:
            group = [r for r in rows if r["k"] == k and r["control"] == control]
            if not group:
                continue
            label = CONTROL_NAMES[control].format(k=k)
            if control == "random":
                label += f" (mean of {len(group)})"
                values = [cell(float(np.mean([r[m] for r in group])), min(r[m] for r in group), max(r[m] for r in group))
                          for m in COLUMNS]
            else:
                values = [cell(group[0][m], group[0][f"{m}_low"], group[0][f"{m}_high"]) for m in COLUMNS]
            out.append([label] + values)
    return out


def collapse_notes(rows: list[dict]) -> list[str]:
    notes = []
    for k in sorted({r["k"] for r in rows}):
        for control in CONTROLS:
            group = [r for r in rows if r["k"] == k and r["control"] == control]
            bad = [r for r in group if r["collapsed"]]
            if not bad:
                continue
            r = bad[0]
            who = CONTROL_NAMES[control].format(k=k) + (f" ({len(bad)} of {len(group)} draws)" if control == "random" else "")
            notes.append(f"collapsed: {who}: accuracy {r['accuracy']:.3f} is chance (1/{round(1 / r['chance'])}) and mean "
                         f"FIG {r['fig']:.4f}, BIG {r['big']:.4f} are near zero: the pruned model no longer uses the image")
    return notes


def pruning_text(rows: list[dict], cfg: Config, seeds: list[int]) -> str:
    """The terminal output: one table per eval set, with what its intervals and controls mean."""
    intervals = (f"[low, high]: {cfg.ci_level:.0%} bootstrap interval over images ({cfg.bootstrap} resamples); "
                 if cfg.bootstrap else "no intervals (config bootstrap: 0); ")
    lines = [intervals + f"random rows: mean of {len(seeds)} draws [min, max over the draws]",
             "conflict acc. (swap): counterfactual conflict accuracy, each masked image's foreground over the "
             "backgrounds of images of other classes, judged against its own label"]
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        first = group[0]
        bir = (f"BIR on the {first['n_mask_images']} images of D with the run's masks: in-sample, the images the heads "
               "were ranked on" if first["bir_in_sample"] else
               f"BIR on {first['n_mask_images']} images, masks learned on the intact model")
        if first.get("n_swaps"):
            bir += f"; {first['n_swaps']} swapped images from them"
        unreadable = f", {first['n_unreadable']} unreadable left out" if first["n_unreadable"] else ""
        lines += ["", f"{name}: {first['url']} ({first['n_images']} images{unreadable}; {bir})",
                  format_table(["heads removed", *COLUMNS.values()], table_rows(group), "l" + "r" * len(COLUMNS))]
        lines += collapse_notes(group)
    return "\n".join(lines)


def heads_lines(run: Run, ks: list[int], scores: list[str]) -> list[str]:
    """Which heads each score removes (the first K of each line are its top K), and the lowest-scored."""
    top = max(ks)
    if top == 0:
        return []
    def named(heads):
        return " ".join(f"{l}.{h}" for l, h in heads)
    first = "the first K are the top K" if len(ks) > 1 else f"top {top}"
    lines = ([f"by {score} ({first}): {named(run.top_heads(top, score))}" for score in scores]
             + [f"lowest-scored first: {named(run.top_heads(top, lowest=True))}"])
    if run.adaptive:
        k = run.resolve_k(None)
        lines.append(f"(adaptive scan: its top {k} set is decided; heads beyond it, the lowest-scored among them, are "
                     "ordered by their means over the images they were measured on, an approximate order)")
    return lines


def auto_k_text(result: AutoK, data: EvalSet, cfg: Config) -> str:
    """The trade-off table (every score and K: clean accuracy, counterfactual conflict accuracy and BIR with
    intervals, the objective's paired gain; random K as control) and why the choice was made."""
    rows, chosen, judged = result.rows, result.chosen, result.judged
    choice = result.choice
    max_clean_drop, objective = choice["max_clean_drop"], choice.get("objective", "bir")
    intact = next(r for r in rows if r["control"] == "intact")
    ks = sorted({r["k"] for r in judged})

    def metrics(r):
        return [cell(r["accuracy"], r["accuracy_low"], r["accuracy_high"]),
                cell(r["conflict_accuracy"], r["conflict_accuracy_low"], r["conflict_accuracy_high"]),
                cell(r["bir_mean"], r["bir_mean_low"], r["bir_mean_high"])]

    table = [["none", "", *metrics(intact), "", "", ""]]
    for k in ks:
        for r in [j for j in judged if j["k"] == k]:
            gain = "n/a" if not np.isfinite(r["gain"]) else (
                f"{r['gain']:+.3f}" + ("" if not np.isfinite(r["gain_low"]) else
                                       f" [{r['gain_low']:+.3f}, {r['gain_high']:+.3f}]"))
            table.append([CONTROL_NAMES[r["control"]].format(k=k), r["heads"], *metrics(r), f"{r['clean_drop']:+.3f}",
                          gain, r["verdict"]])
        draws = [r for r in rows if r["control"] == "random" and r["k"] == k]
        if draws:
            def spread(m):
                v = [r[m] for r in draws]
                return cell(float(np.mean(v)), min(v), max(v))
            gone = sum(r["collapsed"] for r in draws)
            table.append([f"{k} random (mean of {len(draws)})", "", spread("accuracy"), spread("conflict_accuracy"),
                          spread("bir_mean"), f"{intact['accuracy'] - float(np.mean([r['accuracy'] for r in draws])):+.3f}",
                          "", "control" + (f"; {gone} of {len(draws)} collapsed" if gone else "")])
    name = {"conflict": "counterfactual conflict accuracy", "bir": "mean BIR"}[objective]
    gain_name = {"conflict": "conflict gain", "bir": "BIR reduction"}[objective]
    resolution = choice.get("resolution", float("nan"))
    lines = [f"held-out images: {len(data.labels)} correctly classified images of {data.url} that the scores never "
             f"saw (clean accuracy starts at {intact['accuracy']:.3f}); BIR and counterfactual conflict accuracy from "
             f"{len(data.fg)} of them (masks learned on the intact model), {choice.get('n_swaps', 0)} swapped images "
             "(each image's foreground over backgrounds of other classes)",
             f"objective: {name} (--objective {objective}); guard: clean accuracy may drop by at most "
             f"{max_clean_drop:g} (max_clean_drop); a setting must also beat every draw of K random heads"
             + (" and its paired gain interval must lie above 0" if objective == "conflict" else ""),
             f"[low, high]: {cfg.ci_level:.0%} bootstrap interval ({gain_name}: paired, intact and pruned on the same "
             "images; random rows: [min, max] over the draws)"]
    if np.isfinite(resolution):
        lines.append(f"resolution: with {len(data.fg)} masked held-out images, a {name} difference below about "
                     f"{resolution:.3f} cannot be told from noise" + (
                         " (few images: pass more with --mask-images or --eval-data)" if resolution > 0.05 else ""))
    lines += ["", format_table(["heads removed", "heads", "clean accuracy", "conflict acc. (swap)", "BIR (mean)",
                                "clean drop", gain_name, "verdict"], table, "llrrrrrl"), ""]
    lines += collapse_notes([r for r in rows if r["control"] in SCORES])
    lines.append(choice["reason"])
    if chosen is None or objective != "bir":
        return "\n".join(lines)
    k = chosen["k"]
    tempting = [j for j in judged if j["bir_change"] < chosen["bir_change"] and j["verdict"] != "chosen"]
    if tempting:
        best = min(tempting, key=lambda j: j["bir_change"])
        lines.append(f"rejected: the top {best['k']} by {best['control']} lowers BIR more ({best['bir_change']:+.3f}) "
                     f"but {best['verdict']}.")
    draws = [r["bir_mean"] for r in rows if r["control"] == "random" and r["k"] == k]
    if draws and min(draws) <= chosen["bir_mean"]:
        lines.append(f"caution: {sum(d <= chosen['bir_mean'] for d in draws)} of {len(draws)} draws of {k} random heads "
                     f"lowered BIR as far (down to {min(draws):.3f}): the ranking is not clearly better than chance here.")
    elif draws:
        lines.append(f"{k} random head{'s' if k > 1 else ''}, for comparison: BIR {float(np.mean(draws)):.3f} on average "
                     f"(best of {len(draws)} draws {min(draws):.3f}).")
    return "\n".join(lines)


def trade_off_table(rows: list[dict], splits: tuple[str, ...], draws: int) -> str:
    """One line per (K, heads removed): accuracy and mean BIR on each split; random heads as the mean of the draws."""
    table = []
    for k in sorted({r["k"] for r in rows}):
        for control in ("intact", *SCORES, "random"):
            cells = []
            for split in splits:
                group = [r for r in rows if r["set"] == split and r["k"] == k and r["control"] == control]
                if not group:
                    break
                cells += [f"{np.mean([r[m] for r in group]):.3f}" for m in ("accuracy", "conflict_accuracy", "bir_mean")]
            if len(cells) < 3 * len(splits):
                continue
            gone = [r for r in rows if r["k"] == k and r["control"] == control and r["collapsed"]]
            label = "none" if control == "intact" else (f"{k} random (mean of {draws})" if control == "random"
                                                        else f"top {k} by {control}")
            heads = next(r["heads"] for r in rows if r["k"] == k and r["control"] == control) if control in SCORES else ""
            if gone:
                label += f" (collapsed{f' in {len(gone)} draws' if control == 'random' else ''})"
            table.append([label, heads, *cells])
    header = ["heads removed", "heads"] + [f"{split} {m}" for split in splits for m in ("acc", "swap acc", "BIR")]
    return format_table(header, table, "ll" + "r" * (3 * len(splits)))


STYLES = {"big_drop": ("top K by big_drop (paper)", "tab:red", "o"), "bir_drop": ("top K by bir_drop", "tab:purple", "D"),
          "big_minus_fig": ("top K by big_minus_fig", "tab:orange", "v"),
          "swap_drop": ("top K by swap_drop", "tab:brown", "P"), "random": ("K random heads", "tab:blue", "s"),
          "lowest": ("K lowest-scored", "tab:green", "^")}
PANELS = (("accuracy", "accuracy"), ("conflict_accuracy", "counterfactual conflict accuracy (swapped backgrounds)"),
          ("bir_mean", "BIR (mean over images)"))


def trade_off_panel(ax, group: list[dict], name: str) -> None:
    """Clean accuracy (x) against counterfactual conflict accuracy (y) for every score and K, each point with its
    bootstrap intervals on both axes (random heads: the mean of the draws, bars min-max), the intact model a
    black star: up and to the right is better; up and to the left trades clean accuracy for robustness."""
    intact = next(r for r in group if r["control"] == "intact")
    for control, (legend, colour, marker) in STYLES.items():
        points = sorted({r["k"] for r in group if r["control"] == control and r["k"] > 0})
        xs, ys, xerr, yerr = [], [], [[], []], [[], []]
        for k in points:
            draws = [r for r in group if r["control"] == control and r["k"] == k]
            x = [r["accuracy"] for r in draws]
            y = [r["conflict_accuracy"] for r in draws]
            if control == "random":
                lows, highs = (min(x), min(y)), (max(x), max(y))
            else:
                lows = (draws[0]["accuracy_low"], draws[0]["conflict_accuracy_low"])
                highs = (draws[0]["accuracy_high"], draws[0]["conflict_accuracy_high"])
            mx, my = float(np.mean(x)), float(np.mean(y))
            xs.append(mx)
            ys.append(my)
            xerr[0].append(max(mx - lows[0], 0) if np.isfinite(lows[0]) else 0)
            xerr[1].append(max(highs[0] - mx, 0) if np.isfinite(highs[0]) else 0)
            yerr[0].append(max(my - lows[1], 0) if np.isfinite(lows[1]) else 0)
            yerr[1].append(max(highs[1] - my, 0) if np.isfinite(highs[1]) else 0)
        if not xs:
            continue
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=marker, color=colour, ecolor=colour, alpha=0.8, capsize=2,
                    label=legend, markersize=5, elinewidth=0.8)
        for k, x, y in zip(points, xs, ys):
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colour)
    ax.scatter([intact["accuracy"]], [intact["conflict_accuracy"]], marker="*", s=150, color="black", zorder=6,
               label="intact")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("counterfactual conflict accuracy")
    ax.set_title(f"{name}: the trade-off (numbers: K)")
    ax.grid(alpha=0.3)


def sweep_figure(rows: list[dict], ci_level: float) -> bytes:
    """Accuracy, counterfactual conflict accuracy and mean BIR against K, and the trade-off of clean against
    counterfactual conflict accuracy, a row of panels per eval set: the top K by each score with its
    bootstrap band, random heads as the mean of the draws with a min-max band, the lowest-scored; every
    line starts at the intact model, and a black cross marks a pruning that collapsed the model."""
    from matplotlib.figure import Figure

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig = Figure(figsize=(20, 4.0 * len(sets)), layout="constrained")
    axes = fig.subplots(len(sets), len(PANELS) + 1, squeeze=False)
    for panels, name in zip(axes, sets):
        group = [r for r in rows if r["set"] == name]
        intact = next(r for r in group if r["control"] == "intact")
        ks = sorted({r["k"] for r in group if r["k"] > 0})
        for ax, (metric, title) in zip(panels, PANELS):
            collapse_label = "collapsed (chance, FIG and BIG ~ 0)"
            for control, (legend, colour, marker) in STYLES.items():
                draws = [[r for r in group if r["control"] == control and r["k"] == k] for k in ks]
                if not any(draws):
                    continue
                values = [[r[metric] for r in d] for d in draws]
                if control == "random":
                    low, high = [min(v) for v in values], [max(v) for v in values]
                else:
                    low, high = [d[0][f"{metric}_low"] for d in draws], [d[0][f"{metric}_high"] for d in draws]
                x, y = [0] + ks, [intact[metric]] + [float(np.mean(v)) for v in values]
                ax.plot(x, y, color=colour, marker=marker, label=legend)
                if control != "lowest":
                    ax.fill_between(x, [intact[f"{metric}_low"]] + low, [intact[f"{metric}_high"]] + high, color=colour,
                                    alpha=0.1, linewidth=0)
                if control in SCORES:
                    gone = [(k, y[i + 1]) for i, (k, d) in enumerate(zip(ks, draws)) if d[0]["collapsed"]]
                    if gone:
                        ax.scatter(*zip(*gone), marker="x", s=60, color="black", zorder=5, label=collapse_label)
                        collapse_label = None
            if metric in ("accuracy", "conflict_accuracy"):
                ax.axhline(intact["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
                ax.set_ylim(-0.02, 1.02)
            in_sample = " (in-sample: D)" if metric == "bir_mean" and intact["bir_in_sample"] else ""
            ax.set_title(f"{name}: {title}{in_sample}", fontsize=10)
            ax.set_xlabel("K (heads removed together; 0 = intact)")
            ax.set_xticks([0] + ks)
            ax.grid(alpha=0.3)
        trade_off_panel(panels[-1], group, name)
    axes[0][0].legend(loc="best", fontsize="small")
    axes[0][-1].legend(loc="best", fontsize="x-small")
    fig.suptitle(f"Bands and bars: {ci_level:.0%} bootstrap interval over images for each score; random heads min-max "
                 "over draws")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_sweep_figure(run: RunDir, rows: list[dict], ci_level: float) -> str:
    """eval/sweep.png beside eval/sweep.parquet; returns its path or URL."""
    run.write_bytes("eval/sweep.png", sweep_figure(rows, ci_level))
    return run.path("eval/sweep.png")
