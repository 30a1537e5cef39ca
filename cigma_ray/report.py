"""What a run shows a person: the summary and the top heads, as plain-text tables."""
from __future__ import annotations

import numpy as np

from .method import bir_summary
from .storage import RunDir, StorageError


def format_table(header: list[str], rows: list[list], aligns: str | None = None) -> str:
    """A fixed-width text table; `aligns` has one 'l' or 'r' per column."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    aligns = aligns or "l" * len(header)
    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns)).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def run_summary(run: RunDir) -> str:
    meta = run.read_json("run.json")
    lines = [f"run       {run.url}",
             f"model     {meta['model']['name']} ({meta['model']['weights']}, {meta['precision']})",
             f"data      {meta['data']['url']} ({meta['data']['n_images']} images, {len(meta['data']['classes'])} classes)"]
    preds = run.read_folder("predictions", columns=["correct"])
    if preds is not None:
        correct = int(np.sum(preds["correct"].to_numpy(zero_copy_only=False)))
        lines.append(f"accuracy  {correct / max(preds.num_rows, 1):.3f} ({correct}/{preds.num_rows} correct)")
    masks = run.read_folder("masks", columns=["fig", "big"])
    if masks is not None and masks.num_rows:
        s = bir_summary(masks["fig"].to_numpy(), masks["big"].to_numpy())
        lines.append(f"D         {masks.num_rows} images; mean FIG {np.mean(masks['fig'].to_numpy()):.4f}, "
                     f"mean BIG {np.mean(masks['big'].to_numpy()):.4f}, BIR {s['bir_mean']:.3f} (mean), "
                     f"{s['bir_ratio']:.3f} (ratio of means)")
    failures = run.read_folder("failures", columns=["kind"])
    if failures is not None and failures.num_rows:
        kinds = failures["kind"].to_pylist()
        images, units = kinds.count("image"), kinds.count("unit")
        if images:
            lines.append(f"failures  {images} image{'s' if images > 1 else ''} could not be read (see failures/)")
        if units:
            lines.append(f"failures  {units} unit{'s' if units > 1 else ''} failed for good (see failures/)")
    return "\n".join(lines)


def print_top(run: RunDir, top: int | None = None, score: str | None = None) -> None:
    """The run's summary and its top heads, by its score (or `score`), with every other score it has beside them."""
    from .config import resolve_k
    from .method import SCORES
    from .prune import parse_scores

    if not run.exists("rankings.parquet"):
        raise StorageError(f"{run.url} has no rankings.parquet yet; finish the run by running the same scan command again")
    meta = run.read_json("run.json")
    cfg = meta["config"]
    top = top or resolve_k(cfg["top_k"], sum(meta["plan"]["heads_per_layer"]))
    scores = parse_scores(None, meta)
    if score is not None:
        parse_scores(score, meta)
        score = None if score == cfg.get("score", "big_drop") else score
    name = score or cfg.get("score", "big_drop")
    prefix = "" if score is None else f"{score}_"
    ranking = run.read_table("rankings.parquet").sort_by(f"{prefix}rank").slice(0, top).to_pylist()
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
    print(run_summary(run))
    print(f"\ntop {len(rows)} heads by {name}: mean over D of {SCORES[name]}")
    if rounds > 1:
        print(f"(iterative: {rounds} rounds; after each, its top {cfg['k_per_round']} heads were removed "
              "and the rest scanned again on the pruned model; a row's score is from its round)")
        headers, align = headers + ["round"], align + "r"
        rows = [row + [r["round"]] for row, r in zip(rows, ranking)]
    print(format_table(headers, rows, align))
    if not cfg.get("measure_fig", False) and rounds == 1:
        print("(this scan did not measure FIG^(-h), so only big_drop is available; config measure_fig: true adds "
              "bir_drop and big_minus_fig)")


def print_status(run: RunDir) -> None:
    from .pipeline import run_status

    status = run_status(run)
    print(run_summary(run))
    print()
    for stage, (done, total) in status["stages"].items():
        print(f"{stage:<8} {done}/{total} units{'' if done == total else f'  ({total - done} missing)'}")
    if status["meta"]["config"].get("rounds", 1) > len([s for s in status["stages"] if s.startswith("scan")]) > 0:
        print("later scan rounds: planned once the round before them is ranked")
    if "mask" not in status["stages"]:
        print("mask, scan: planned once predict is complete")
    print(f"ranked   {'yes' if status['ranked'] else 'no'}")
    units = [f for f in status["failures"] if f["kind"] == "unit"]
    for f in units:
        print(f"failed   {f['unit']} after {f['attempts']} attempts: {(f['error'] or '').splitlines()[0] if f['error'] else ''}")
    if units:
        print("run the same scan command again to retry the failed units")
