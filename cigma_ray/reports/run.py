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
    ranking = run.rankings().sort_by(f"{prefix}rank").slice(0, top).to_pylist()
    value = prefix[:-1] if prefix else "score"
    level = cfg["ci_level"]
    rows = [[r[f"{prefix}rank"], r["layer"], r["head"], f"{r[value]:+.5f}", f"{r[prefix + 'stderr']:.5f}",
             f"[{r[prefix + 'ci_low']:+.5f}, {r[prefix + 'ci_high']:+.5f}]", r["n"]] for r in ranking]
    headers, align = ["rank", "layer", "head", name, "stderr", f"{level:.0%} CI (bootstrap)", "n"], "rrrrrlr"
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
    lines.append(format_table(headers, rows, align))
    if not cfg.get("measure_fig", False) and rounds == 1:
        lines.append("(this scan did not measure FIG^(-h), so bir_drop and big_minus_fig are not available; config "
                     "measure_fig: true adds them)")
    if not cfg.get("measure_swap", False) and rounds == 1:
        lines.append("(this scan did not measure SWAP^(-h), so swap_drop is not available; config measure_swap: true "
                     "adds it)")
    return "\n".join(lines)


def status_text(run: RunDir, status: dict) -> str:
    """`cigma-ray status`: the summary, each stage's units done and missing, and failed units."""
    lines = [run_summary(run), ""]
    for stage, (done, total) in status["stages"].items():
        lines.append(f"{stage:<8} {done}/{total} units{'' if done == total else f'  ({total - done} missing)'}")
    if status["meta"]["config"].get("rounds", 1) > len([s for s in status["stages"] if s.startswith("scan")]) > 0:
        lines.append("later scan rounds: planned once the round before them is ranked")
    if "mask" not in status["stages"]:
        lines.append("mask, scan: planned once predict is complete")
    lines.append(f"ranked   {'yes' if status['ranked'] else 'no'}")
    units = [f for f in status["failures"] if f["kind"] == "unit"]
    for f in units:
        lines.append(f"failed   {f['unit']} after {f['attempts']} attempts: "
                     f"{(f['error'] or '').splitlines()[0] if f['error'] else ''}")
    if units:
        lines.append("run the same scan command again to retry the failed units")
    return "\n".join(lines)
