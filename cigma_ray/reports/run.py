"""What a run shows a person in the terminal: its summary, its top heads, its status."""
from __future__ import annotations

import numpy as np

from ..method import SCORES, bir_summary
from ..rundir import Run, RunDir
from .tables import format_table


def run_summary(run: RunDir) -> str:
    meta = run.read_json("run.json")
    lines = [f"run       {run.url}",
             f"model     {meta['model']['name']} ({meta['model']['weights']}, {meta['precision']})",
             f"data      {meta['data']['url']} ({meta['data']['n_images']} images, {len(meta['data']['classes'])} classes)"]
    lines += skipped_lines(meta)
    preds = run.read_folder("predictions", columns=["correct"])
    if preds is not None:
        correct = int(np.sum(preds["correct"].to_numpy(zero_copy_only=False)))
        lines.append(f"accuracy  {correct / max(preds.num_rows, 1):.3f} ({correct}/{preds.num_rows} correct)")
    swap = meta["config"].get("measure_swap", False)
    masks = run.read_folder("masks", columns=["fig", "big"] + (["swap"] if swap else []))
    if masks is not None and masks.num_rows:
        s = bir_summary(masks["fig"].to_numpy(), masks["big"].to_numpy())
        lines.append(f"D         {masks.num_rows} images; mean FIG {np.mean(masks['fig'].to_numpy()):.4f}, "
                     f"mean BIG {np.mean(masks['big'].to_numpy()):.4f}, BIR {s['bir_mean']:.3f} (mean), "
                     f"{s['bir_ratio']:.3f} (ratio of means)"
                     + (f"; mean SWAP {np.mean(masks['swap'].to_numpy()):.4f} (background of another class)" if swap else ""))
    if meta["config"].get("ablation", "zero") == "mean":
        lines.append("ablation  mean: an ablated head outputs its mean over D's images and tokens (means/)")
    failures = run.read_folder("failures", columns=["kind"])
    if failures is not None and failures.num_rows:
        kinds = failures["kind"].to_pylist()
        images, units = kinds.count("image"), kinds.count("unit")
        if images:
            lines.append(f"failures  {images} image{'s' if images > 1 else ''} could not be read (see failures/)")
        if units:
            lines.append(f"failures  {units} unit{'s' if units > 1 else ''} failed for good (see failures/)")
    return "\n".join(lines)


def skipped_lines(meta: dict) -> list[str]:
    """Layers whose heads were not scanned, and why (run.json's model.skipped_layers), layers with one reason
    on one line."""
    skipped = meta["model"].get("skipped_layers") or {}
    labels = meta["model"].get("layer_labels") or [str(i) for i in range(len(meta["plan"]["heads_per_layer"]))]
    by_reason: dict[str, list[int]] = {}
    for layer, why in skipped.items():
        by_reason.setdefault(why, []).append(int(layer))
    lines = []
    for why, layers in by_reason.items():
        heads = sum(meta["plan"]["heads_per_layer"][layer] for layer in layers)
        lines.append(f"skipped   layer{'s' if len(layers) > 1 else ''} {', '.join(labels[l] for l in sorted(layers))} "
                     f"({heads} heads, not scanned or ranked): {why}")
    return lines


def top_heads_text(run: Run, top: int | None = None, score: str | None = None) -> str:
    """The run's summary and its top heads, by its score (or `score`), with every other score it has beside them."""
    meta = run.meta
    cfg = meta["config"]
    top = top or run.resolve_k(None)
    scores = run.scores
    if score is not None:
        run.parse_scores(score)
        score = None if score == run.score else score
    name = score or cfg.get("score", "big_drop")
    prefix = "" if score is None else f"{score}_"
    order = run.rank_column(score)  # the one notion of rank every command uses
    ranking = run.rankings().sort_by(order).slice(0, top).to_pylist()
    value = prefix[:-1] if prefix else "score"
    level = cfg["ci_level"]
    rows = [[r[order], r["layer"], r["head"], f"{r[value]:+.5f}", f"{r[prefix + 'stderr']:.5f}",
             f"[{r[prefix + 'ci_low']:+.5f}, {r[prefix + 'ci_high']:+.5f}]", r["n"]] for r in ranking]
    interval = (f"interval (joint, {1 - cfg['delta']:.0%})" if run.adaptive else f"{level:.0%} CI (bootstrap)")
    headers, align = ["rank", "layer", "head", name, "stderr", interval, "n"], "rrrrrlr"
    labels = meta["model"].get("layer_labels")
    if labels:  # a vision-language model's heads are vision.L.H or text.L.H
        headers, align = ["name"] + headers, "l" + align
        rows = [[f"{labels[r['layer']]}.{r['head']}"] + row for row, r in zip(rows, ranking)]
    others = [s for s in scores if s != name] if cfg.get("rounds", 1) == 1 else []
    for other in others:
        headers, align = headers + [f"{other} (rank)"], align + "r"
        rows = [row + [f"{r[other]:+.5f} ({r[f'{other}_rank']})"] for row, r in zip(rows, ranking)]
    rounds = cfg.get("rounds", 1)
    lines = [run_summary(run.dir), f"\ntop {len(rows)} heads by {name}: mean over D of {SCORES[name]}"]
    if rounds > 1:
        lines.append(f"(iterative: {rounds} rounds; after each, its top {cfg['k_per_round']} heads were removed "
                     "and the rest scanned again on the pruned model; a row's score is from its round)")
        headers, align = headers + ["round"], align + "r"
        rows = [row + [r["round"]] for row, r in zip(rows, ranking)]
    if run.adaptive:
        headers, align = headers + ["decided"], align + "l"
        rows = [row + [decided_text(r, run)] for row, r in zip(rows, ranking)]
    lines.append(format_table(headers, rows, align))
    if run.adaptive:
        lines.append(adaptive_note(run))
    elif rounds == 1:
        if not cfg.get("measure_fig", False):
            lines.append("(this scan did not measure FIG^(-h), so bir_drop and big_minus_fig are not available; "
                         "config measure_fig: true adds them)")
        if not cfg.get("measure_swap", False):
            lines.append("(this scan did not measure SWAP^(-h), so swap_drop is not available; config measure_swap: "
                         "true adds it)")
    return "\n".join(lines)


def decided_text(row: dict, run: Run) -> str:
    """How an adaptive run decided a head: in or out of the top K, and after how many images of D."""
    where = "in top K" if row["in_top_k"] else "out"
    return f"{where} after {row['n']} images" if row["decided_early"] else f"{where} on all of D"


def adaptive_note(run: Run) -> str:
    """What an adaptive ranking promises, and what it cost."""
    cfg = run.meta["config"]
    k = run.resolve_k(None)
    spent = ""
    if run.dir.exists("adaptive.json"):
        a = run.dir.read_json("adaptive.json")
        spent = (f"; it measured {a['pairs']:,} of the exhaustive scan's {a['exhaustive_pairs']:,} (head, image) "
                 f"pairs ({a['exhaustive_pairs'] / max(1, a['pairs']):.2f}x fewer) in {a['rounds']} rounds")
    return (f"(adaptive scan, delta {cfg['delta']}: with probability at least {1 - cfg['delta']:.2f} its top {k} set is "
            f"the exhaustive scan's on the same D and masks{spent}. Intervals are the confidence sequence's, valid for "
            f"all heads and rounds together, that decided each head. Heads below the top {k} are ordered by their means "
            "over the images they were measured on: the tail's order is approximate.)")


def status_text(run: RunDir, status: dict) -> str:
    """`cigma-ray status`: the summary, each stage's units done and missing, and failed units."""
    lines = [run_summary(run), ""]
    rounds = [(name, counts) for name, counts in status["stages"].items() if name.startswith("adaptive round")]
    for stage, (done, total) in status["stages"].items():
        if not stage.startswith("adaptive round"):
            lines.append(f"{stage:<8} {done}/{total} units{'' if done == total else f'  ({total - done} missing)'}")
    if rounds:  # one line for the complete rounds, one for the round in progress
        complete = [c for _, c in rounds if c[0] == c[1]]
        if complete:
            lines.append(f"adaptive rounds 0-{len(complete) - 1}: {sum(c[1] for c in complete)} units, all done")
        for name, (done, total) in rounds[len(complete):]:
            lines.append(f"{name}: {done}/{total} units  ({total - done} missing)")
    if status["meta"]["config"].get("rounds", 1) > len([s for s in status["stages"] if s.startswith("scan")]) > 0:
        lines.append("later scan rounds: planned once the round before them is ranked")
    if "mask" not in status["stages"]:
        lines.append("mask, scan: planned once predict is complete")
    adaptive = status.get("adaptive")
    if adaptive is not None:
        lines.append(f"adaptive {adaptive['rounds']} rounds done{'' if adaptive['finished'] else ' so far'}: "
                     f"{adaptive['pairs']:,} of {adaptive['exhaustive_pairs']:,} (head, image) pairs measured; "
                     f"{adaptive['decided_in']} heads decided in, {adaptive['decided_out']} out"
                     + ("" if adaptive["finished"] else "; later rounds are planned once the round before them is done"))
    lines.append(f"ranked   {'yes' if status['ranked'] else 'no'}")
    damaged = status.get("damaged", {})
    for file, why in damaged.items():
        lines.append(f"damaged  {file}: {why}")
    if damaged:
        lines.append(f"{len(damaged)} damaged unit file(s), counted as missing: run the same scan command again to "
                     "redo them (rankings.parquet is made again from whole files)")
    units = [f for f in status["failures"] if f["kind"] == "unit"]
    for f in units:
        lines.append(f"failed   {f['unit']} after {f['attempts']} attempts: "
                     f"{(f['error'] or '').splitlines()[0] if f['error'] else ''}")
    if units:
        lines.append("run the same scan command again to retry the failed units")
    return "\n".join(lines)
