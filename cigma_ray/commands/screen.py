"""`cigma-ray screen RUN`: every head's first-order estimate of each score from one forward and one backward
per view and image (the gradient pre-screen), and its fidelity to the run's exact scan where there is one."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..config import ConfigError
from .options import add_run_arg, check_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p, "run directory (made by `cigma-ray scan`; its predictions and masks are made first if missing)")
    p.add_argument("--top", type=int, help="heads printed (default: the run's top_k)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--checkpoint", help="the scanned weights, when the file has moved since the scan")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class Settings:
    run: str
    top: int | None = None
    device: str = "cpu"
    checkpoint: str | None = None
    quiet: bool = False


def settings(args: argparse.Namespace) -> Settings:
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top {args.top}: give a count of heads of 1 or more")
    return Settings(args.run, args.top, args.device, args.checkpoint, args.quiet)


def run(s: Settings) -> int:
    import time

    from ..method.fidelity import fidelity
    from ..pipeline import Job, Pipeline
    from ..pipeline.screen import screen_ranking
    from ..reports.screen import screen_text
    from ..rundir import open_run

    ranked = open_run(s.run)
    job = Job.of_run(ranked.meta, s.run, check_device(s.device), s.checkpoint)
    pipeline = Pipeline(job, progress=not s.quiet)
    k = ranked.resolve_k(None)
    top = ranked.resolve_k(s.top, "--top") if s.top is not None else k
    selected = pipeline.prepare()  # what the screen reads: D, its masks (and a mean-ablation run's means)
    start = time.perf_counter()
    estimates = pipeline.screen(selected)
    seconds = time.perf_counter() - start
    heads = pipeline.adapter.scanned_heads  # the estimates' order (skipped layers' heads are not screened)
    ranked.dir.write_table("screen.parquet", screen_ranking(heads, estimates))
    exact, why = None, None
    if not ranked.dir.exists("rankings.parquet"):
        why = "the run has no exact scan yet (no rankings.parquet)"
    elif ranked.adaptive:
        why = "the run's scan is adaptive: most heads were measured on part of D, so it is no exact reference"
    elif ranked.rounds > 1:
        why = "the run is iterative: its later rounds scanned a pruned model"
    else:
        exact = ranked.rankings().sort_by([("layer", "ascending"), ("head", "ascending")])
    rows = {}
    if exact is not None:
        rows = {name: fidelity(values, exact[name].to_numpy(), k) for name, values in estimates.items()
                if name in exact.column_names}
    result = {"k": k, "images": len(selected), "seconds": seconds, "fidelity": rows}
    ranked.dir.write_json("screen.json", result)
    print(screen_text(ranked, heads, estimates, result, top, why))
    return 0
