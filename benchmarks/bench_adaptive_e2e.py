"""Is `scan --adaptive` faster end to end than the exhaustive scan? Timed on a finished exhaustive run.

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive_e2e.py RUN [--orders none,screen] [--repeats 1] [--whole]
                                                            [--json FILE]

For each variant (the exhaustive scan, and the adaptive scan with each --order), a fresh run directory gets
RUN's predictions/ and masks/ (the predict and mask stages are the same for every variant, so they are not
timed again; their time is RUN's own; with --whole they are run and timed too: the whole scan command on RUN's
model, data and config) and the scan command's pipeline runs in this process, as `cigma-ray scan` runs it: the model load, the rounds (for the adaptive scan: the pre-screen with --order screen, every round's
units, reading each round back, the decisions) and the ranking. Variants run in turn, `--repeats` times, each
keeping its best time. Both the wall time and this process's CPU time are kept: on a machine shared with other
jobs the wall time follows their load, while the CPU time (one thread: OMP_NUM_THREADS=1) follows the work;
the comparison is made on the CPU time. It also checks that every adaptive top-K set is the exhaustive one.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cigma_ray.bench import machine
from cigma_ray.pipeline import Job, Pipeline
from cigma_ray.rundir import RunDir, open_run


def timed_scan(run_url: str, out: Path, adaptive: dict, whole: bool = False) -> tuple[float, float, dict | None]:
    """Wall and CPU seconds of the scan command's pipeline on RUN's predictions and masks (whole: from nothing),
    and the adaptive summary."""
    run = open_run(run_url)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for folder in () if whole else ("predictions", "masks"):
        shutil.copytree(Path(run.dir.path(folder)), out / folder)
    job = Job.of_run(run.meta, str(out))
    cfg = run.config.replace(**adaptive) if adaptive else run.config
    start, cpu = time.perf_counter(), time.process_time()
    Pipeline(Job(model=job.model, data=job.data, out=str(out), config=cfg, precision=job.precision),
             progress=False).run_all()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    summary = RunDir(str(out)).read_json("adaptive.json") if adaptive else None
    return seconds, cpu, summary


def top_k(out: Path, k: int) -> set:
    return {(r["layer"], r["head"]) for r in pq.read_table(out / "rankings.parquet").slice(0, k).to_pylist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished exhaustive run (its predictions and masks are reused)")
    p.add_argument("--orders", default="none,screen", help="adaptive variants to time (adaptive_order values)")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--whole", action="store_true", help="also run and time the predict and mask stages")
    p.add_argument("--json")
    args = p.parse_args(argv)
    run = open_run(args.run)
    k = run.resolve_k(None)
    variants = {"exhaustive": {}} | {f"adaptive, order {o}": {"adaptive": True, "delta": args.delta,
                                                              "adaptive_order": o} for o in args.orders.split(",")}
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    summaries: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory(prefix="cigma-e2e-") as tmp:
        for _ in range(args.repeats):
            for i, (name, keys) in enumerate(variants.items()):
                out = Path(tmp) / f"v{i}"
                seconds, cpu, summaries[name] = timed_scan(args.run, out, keys, args.whole)
                best[name] = min(best.get(name, float("inf")), seconds)
                best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
                if keys:
                    assert top_k(out, k) == top_k(Path(tmp) / "v0", k), f"{name}: top-K set differs"
                print(f"{name:<26} {seconds:7.1f} s wall, {cpu:7.1f} s CPU", flush=True)
    base = best_cpu["exhaustive"]
    print(f"\nrun {args.run}: {run.meta['model']['name']}, {run.n_heads} heads, K = {k}, delta {args.delta}; "
          f"torch threads {torch.get_num_threads()}; best of {args.repeats}")
    print(f"{'scan':<26} {'CPU s':>8} {'vs exhaustive':>14} {'wall s':>8} {'pairs':>10} {'of':>10} {'rounds':>6}")
    rows = []
    for name, cpu in best_cpu.items():
        s = summaries[name]
        pairs = f"{s['pairs']:>10,} {s['exhaustive_pairs']:>10,} {s['rounds']:>6}" if s else ""
        print(f"{name:<26} {cpu:8.1f} {base / cpu:13.2f}x {best[name]:8.1f} {pairs}")
        rows.append({"scan": name, "cpu_seconds": cpu, "wall_seconds": best[name], "speedup_cpu": base / cpu,
                     "speedup_wall": best["exhaustive"] / best[name], "adaptive": s})
    print("(every adaptive top-K set equals the exhaustive one; "
          + ("predict and mask stages included)" if args.whole else "predict and mask stages excluded: the same for all)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "k": k, "delta": args.delta, "repeats": args.repeats,
                                               "whole": args.whole, "rows": rows, "machine": machine()},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
