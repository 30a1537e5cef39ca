"""Which score and ablation remove a background shortcut: every score x ablation x K against K random heads and
the K lowest-scored, on real aligned and conflicting test splits, and whether `prune --auto-k` (each objective,
several guards) chooses a pruning that helps on the real conflicting split.

    python benchmarks/bench_shortcut.py [--benchmark shapes|scenes] [--work runs/bench-shortcut] [--ks 1,2,4,8] [--seeds 5]
        [--model timm:NAME --checkpoint FILE --model-kwargs JSON --scan DIR --aligned DIR --conflicting DIR --name N]

Default: the built-in demo (`--benchmark shapes`, or `scenes`: its shipped ViT, its data generated under
WORK/BENCHMARK_data). For another model and
data, give the scan split (the training distribution: D and --auto-k's held-out images come from it) and the
aligned and conflicting test splits (ImageFolder trees of the same classes).

For each ablation (zero, mean) the model is scanned once with every score measured (measure_fig and
measure_swap); the mean run reuses the zero run's predictions and masks (they do not depend on the ablation).
Each pruning is evaluated on both test splits: accuracy, counterfactual conflict accuracy (masked images'
foregrounds over backgrounds of other classes) and mean BIR, with bootstrap intervals. --auto-k's rows are
evaluated once per ablation on the held-out images; each (objective, guard) then chooses, and the choice is
looked up on the real conflicting split, with a paired interval of its gain over the intact model.

Writes benchmarks/results/shortcut-NAME-MACHINE-DATE.json and .md (the README's table), with the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cigma_ray.bench.suite import machine
from cigma_ray.config import Config
from cigma_ray.data import open_source
from cigma_ray.evaluation import choose_pruning, eval_set, heldout_set, random_heads
from cigma_ray.evaluation.autok import auto_k_rows, paired_gain
from cigma_ray.evaluation.experiments import experiment_rows
from cigma_ray.models import ModelSpec
from cigma_ray.pipeline import Job, Pipeline
from cigma_ray.progress import ProgressLines
from cigma_ray.rundir import open_run

RESULTS = Path(__file__).parent / "results"
ABLATIONS = ("zero", "mean")
OBJECTIVES = ("conflict", "bir")
GUARDS = (0.02, 0.05, 0.10)
METRICS = ("accuracy", "conflict_accuracy", "bir_mean")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def builtin_setup(name: str, work: Path, data_root: Path, reduced: bool) -> dict:
    """A built-in benchmark of `cigma-ray demo` (shapes or scenes): its shipped model, data and config."""
    from cigma_ray.demo.run import benchmark

    bench = benchmark(name)
    paths = bench.ensure_data(data_root, reduced)
    return {"name": name + ("-reduced" if reduced else ""), "spec": bench.spec(), "scan": str(paths["scan"]),
            "aligned": str(paths["aligned"]), "conflicting": str(paths["conflicting"]), "config": bench.config}


def scan(setup: dict, work: Path, mask_steps: int | None) -> dict[str, str]:
    """The zero and mean runs (the mean one starts from the zero one's predictions and masks)."""
    cfg = setup["config"].replace(measure_fig=True, measure_swap=True)
    if mask_steps is not None:
        cfg = cfg.replace(mask_steps=mask_steps)
    outs = {}
    for ablation in ABLATIONS:
        out = work / ablation
        job = Job(model=setup["spec"], data=setup["scan"], out=str(out), config=cfg.replace(ablation=ablation))
        if ablation != ABLATIONS[0]:
            for folder in ("predictions", "masks"):
                if not (out / folder).exists():
                    shutil.copytree(work / ABLATIONS[0] / folder, out / folder)
        start = time.perf_counter()
        Pipeline(job, progress=False).run_all()
        log(f"scan ({ablation} ablation): {time.perf_counter() - start:.0f} s")
        outs[ablation] = str(out)
    return outs


def share_eval_masks(outs: dict[str, str]) -> None:
    """Eval sets' masks are learned on the intact model: the same for either ablation, learned once."""
    first = Path(outs[ABLATIONS[0]]) / "eval"
    for ablation in ABLATIONS[1:]:
        target = Path(outs[ablation]) / "eval"
        target.mkdir(exist_ok=True)
        for f in first.glob("masks-*.parquet"):
            if not (target / f.name).exists():
                shutil.copy(f, target / f.name)


def plan_for(scanned, ks: list[int], seeds: list[int], scores: list[str]) -> list[tuple]:
    run = scanned.run
    plan = [("intact", None, [])]
    for k in ks:
        plan += [(score, None, run.top_heads(k, score)) for score in scores]
        plan += [("random", s, random_heads(scanned.heads, k, s)) for s in seeds]
        plan += [(f"lowest:{score}", None, run.top_heads(k, score, lowest=True)) for score in scores]
    return plan


def evaluate_splits(scanned, setup: dict, ks: list[int], seeds: list[int], mask_images: int) -> tuple[list, dict]:
    """Rows of every pruning on both test splits, and the per-image values of the conflicting split's rows."""
    scores = scanned.run.scores
    plan = plan_for(scanned, ks, seeds, scores)
    rows, per_image = [], {}
    for split in ("aligned", "conflicting"):
        data = eval_set(scanned, open_source(setup[split]), mask_images, split)
        values: list[dict] = []
        start = time.perf_counter()
        rows += experiment_rows(scanned.replica, data, plan, scanned.cfg, ProgressLines(split, len(plan), True), values)
        per_image[split] = values
        log(f"  {split}: {len(plan)} prunings in {time.perf_counter() - start:.0f} s")
    return rows, per_image


def auto_k_study(scanned, rows: list[dict], per_conflicting: list[dict], ks: list[int], seeds: list[int],
                 heldout_images: int) -> dict:
    """--auto-k's rows on the held-out images once, then each (objective, guard)'s choice and what it does on
    the real conflicting split (paired gain in accuracy over the intact model)."""
    cfg = scanned.cfg
    data = heldout_set(scanned, None, heldout_images, swaps=True)
    values: list[dict] = []
    start = time.perf_counter()
    held = auto_k_rows(scanned, data, ks, seeds, scanned.run.scores, 1.0, False, values)
    log(f"  auto-k rows on {len(data.labels)} held-out images ({len(data.fg)} masked): "
        f"{time.perf_counter() - start:.0f} s")
    conflicting = [r for r in rows if r["set"] == "conflicting"]
    intact_at = next(i for i, r in enumerate(conflicting) if r["control"] == "intact")
    choices = []
    for objective in OBJECTIVES:
        for guard in GUARDS:
            chosen, judged = choose_pruning(held, guard, objective, values, cfg.bootstrap, cfg.ci_level, cfg.seed)
            entry = {"objective": objective, "max_clean_drop": guard,
                     "chosen": None if chosen is None else {"score": chosen["control"], "k": chosen["k"],
                                                            "heads": chosen["heads"], "gain": chosen["gain"],
                                                            "gain_low": chosen["gain_low"],
                                                            "gain_high": chosen["gain_high"],
                                                            "heldout_clean_accuracy": chosen["accuracy"]},
                     "verdicts": {f"{j['control']}@{j['k']}": j["verdict"] for j in judged}}
            if chosen is not None:
                at = next(i for i, r in enumerate(conflicting) if r["control"] == chosen["control"]
                          and r["k"] == chosen["k"])
                gain = paired_gain(per_conflicting[intact_at]["correct"], per_conflicting[at]["correct"], 1,
                                   cfg.bootstrap, cfg.ci_level, cfg.seed)
                aligned = next(r for r in rows if r["set"] == "aligned" and r["control"] == chosen["control"]
                               and r["k"] == chosen["k"])
                entry["on_test"] = {"conflicting_accuracy": conflicting[at]["accuracy"],
                                    "conflicting_gain": gain[0], "conflicting_gain_low": gain[1],
                                    "conflicting_gain_high": gain[2], "aligned_accuracy": aligned["accuracy"]}
            choices.append(entry)
    return {"n_heldout": len(data.labels), "n_masked": len(data.fg), "rows": held, "choices": choices}


def fmt(r: dict, metric: str) -> str:
    v = r.get(metric)
    if v is None or not np.isfinite(v):
        return "n/a"
    low, high = r.get(f"{metric}_low"), r.get(f"{metric}_high")
    return f"{v:.3f}" if low is None or not np.isfinite(low) else f"{v:.3f} [{low:.2f}, {high:.2f}]"


def spread(group: list[dict], metric: str) -> str:
    v = [r[metric] for r in group]
    return f"{np.mean(v):.3f} [{min(v):.2f}, {max(v):.2f}]"


def markdown(result: dict) -> str:
    """The table the README shows, and the auto-k choices."""
    lines = []
    for ablation, part in result["ablations"].items():
        rows = part["rows"]
        lines += [f"#### {ablation} ablation", "",
                  "| heads removed | K | aligned acc. | conflicting acc. | swap acc. (aligned) | BIR (aligned) |",
                  "|---|---|---|---|---|---|"]
        ks = sorted({r["k"] for r in rows if r["k"] > 0})
        by = {}
        for r in rows:
            by.setdefault((r["set"], r["control"], r["k"]), []).append(r)
        intact = {s: by[(s, "intact", 0)][0] for s in ("aligned", "conflicting")}
        lines.append(f"| none | 0 | {fmt(intact['aligned'], 'accuracy')} | {fmt(intact['conflicting'], 'accuracy')} | "
                     f"{fmt(intact['aligned'], 'conflict_accuracy')} | {fmt(intact['aligned'], 'bir_mean')} |")
        controls = [c for c in dict.fromkeys(r["control"] for r in rows) if c not in ("intact",)]
        for k in ks:
            for control in controls:
                if control.startswith("lowest:") and control != f"lowest:{part['score']}":
                    continue
                a, c = by.get(("aligned", control, k)), by.get(("conflicting", control, k))
                if not a:
                    continue
                if control == "random":
                    cells = [spread(a, "accuracy"), spread(c, "accuracy"), spread(a, "conflict_accuracy"),
                             spread(a, "bir_mean")]
                    label = f"random (mean [min, max] of {len(a)})"
                else:
                    cells = [fmt(a[0], "accuracy"), fmt(c[0], "accuracy"), fmt(a[0], "conflict_accuracy"),
                             fmt(a[0], "bir_mean")]
                    label = (f"lowest by {control.split(':')[1]}" if control.startswith("lowest:") else f"top by {control}")
                lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["| --auto-k objective | guard | chosen | held-out gain [interval] | conflicting acc. "
                  "(gain [paired interval]) | aligned acc. |", "|---|---|---|---|---|---|"]
        for ch in part["auto_k"]["choices"]:
            chosen = ch["chosen"]
            if chosen is None:
                lines.append(f"| {ch['objective']} | {ch['max_clean_drop']:g} | none | | "
                             f"{intact['conflicting']['accuracy']:.3f} (intact) | {intact['aligned']['accuracy']:.3f} |")
                continue
            test = ch["on_test"]
            lines.append(f"| {ch['objective']} | {ch['max_clean_drop']:g} | top {chosen['k']} by {chosen['score']} | "
                         f"{chosen['gain']:+.3f} [{chosen['gain_low']:+.3f}, {chosen['gain_high']:+.3f}] | "
                         f"{test['conflicting_accuracy']:.3f} ({test['conflicting_gain']:+.3f} "
                         f"[{test['conflicting_gain_low']:+.3f}, {test['conflicting_gain_high']:+.3f}]) | "
                         f"{test['aligned_accuracy']:.3f} |")
        lines.append("")
    proxy = result.get("proxy")
    if proxy:
        lines.append(f"Counterfactual conflict accuracy on the aligned split against real conflicting accuracy, over "
                     f"all {proxy['n']} prunings: Pearson {proxy['pearson']:.2f}, Spearman {proxy['spearman']:.2f}.")
    return "\n".join(lines) + "\n"


def proxy_agreement(parts: dict) -> dict:
    from cigma_ray.method import spearman

    xs, ys = [], []
    for part in parts.values():
        by = {(r["control"], r["k"], r["seed"]): r for r in part["rows"] if r["set"] == "aligned"}
        for r in part["rows"]:
            if r["set"] == "conflicting":
                a = by[(r["control"], r["k"], r["seed"])]
                xs.append(a["conflict_accuracy"])
                ys.append(r["accuracy"])
    xs, ys = np.array(xs), np.array(ys)
    return {"n": len(xs), "pearson": float(np.corrcoef(xs, ys)[0, 1]), "spearman": spearman(xs, ys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench-shortcut", help="run directories and data (reused when rerun)")
    parser.add_argument("--benchmark", default="shapes", choices=["shapes", "scenes"],
                        help="the built-in benchmark (`cigma-ray demo --benchmark`) when no --model is given")
    parser.add_argument("--reduced", action="store_true", help="scenes: its small form (a smoke run)")
    parser.add_argument("--demo-data", help="where the benchmark's data is (generated if missing; default "
                        "WORK/BENCHMARK_data)")
    parser.add_argument("--name", help="benchmark name in the result files (default: the benchmark's, else the model's)")
    parser.add_argument("--model", help="timm:NAME (default: the built-in benchmark's ViT)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--model-kwargs", default="{}", help="JSON of timm.create_model arguments")
    parser.add_argument("--scan", help="the scan split (training distribution)")
    parser.add_argument("--aligned", help="the aligned test split")
    parser.add_argument("--conflicting", help="the conflicting test split")
    parser.add_argument("--ks", default="1,2,4,8", help="K values (default 1,2,4,8)")
    parser.add_argument("--seeds", type=int, default=5, help="draws of K random heads (default 5)")
    parser.add_argument("--mask-images", type=int, default=128, help="masked images per test split (default 128)")
    parser.add_argument("--heldout-images", type=int, default=256, help="masked held-out images for --auto-k "
                        "(default 256, prune --auto-k's)")
    parser.add_argument("--mask-steps", type=int, help="mask steps of the scan (default: the config's, 250)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON and the table go (default "
                        "benchmarks/results)")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        setup = builtin_setup(args.benchmark, work, Path(args.demo_data) if args.demo_data
                              else work / f"{args.benchmark}_data", args.reduced)
    else:
        setup = {"name": args.name or args.model.split(":")[-1], "scan": args.scan, "aligned": args.aligned,
                 "conflicting": args.conflicting, "config": Config(top_k=3, unit_images=32),
                 "spec": ModelSpec(args.model, checkpoint=args.checkpoint, model_kwargs=json.loads(args.model_kwargs))}
    name = args.name or setup["name"]
    ks = [int(k) for k in args.ks.split(",")]
    load_start = os.getloadavg()
    start = time.perf_counter()
    outs = scan(setup, work, args.mask_steps)
    parts = {}
    for ablation in ABLATIONS:
        log(f"evaluating the {ablation}-ablation run")
        share_eval_masks(outs)
        scanned = open_run(outs[ablation]).reopen()
        seeds = [scanned.cfg.seed + i for i in range(args.seeds)]
        rows, per_image = evaluate_splits(scanned, setup, ks, seeds, args.mask_images)
        share_eval_masks(outs)
        study = auto_k_study(scanned, rows, per_image["conflicting"], ks, seeds, args.heldout_images)
        parts[ablation] = {"run": outs[ablation], "score": scanned.cfg.score, "rows": rows, "auto_k": study,
                           "config": scanned.cfg.to_dict()}
    info = machine()
    info["load_average_start"], info["load_average_end"] = load_start, os.getloadavg()
    info["cores"] = os.cpu_count()
    result = {"benchmark": "shortcut", "name": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "seconds": round(time.perf_counter() - start, 1), "ks": ks, "random_seeds": args.seeds,
              "mask_images_per_split": args.mask_images, "heldout_images": args.heldout_images,
              "data": {k: setup[k] for k in ("scan", "aligned", "conflicting")}, "model": dataclasses.asdict(setup["spec"]),
              "ablations": parts}
    result["proxy"] = proxy_agreement(parts)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    cpu = "".join(ch if ch.isalnum() else "-" for ch in info["cpu"].lower()).strip("-")[:24]
    stem = f"shortcut-{name}-{platform.machine()}-{cpu}-{datetime.now().date().isoformat()}"
    (results / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    (results / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {results / stem}.json and .md ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
