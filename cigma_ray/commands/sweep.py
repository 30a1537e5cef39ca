"""`cigma-ray sweep RUN --k 0,4,8`: `prune` for several K, with a plot of accuracy and BIR against K."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .options import EvalOptions, add_eval_args, add_run_arg, parse_ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p, "run directory with a rankings.parquet")
    p.add_argument("--k", required=True, metavar="K1,K2,...", help="numbers of heads to remove, e.g. 0,4,8,16")
    add_eval_args(p)


@dataclass(frozen=True)
class Settings:
    eval: EvalOptions
    ks: tuple[int, ...]


def settings(args: argparse.Namespace) -> Settings:
    return Settings(EvalOptions.from_args(args), tuple(parse_ks(args.k)))


def run(s: Settings) -> int:
    from ..evaluation import eval_sets, sweep
    from ..reports.pruning import heads_lines, pruning_text, write_sweep_figure
    from ..rundir import open_run

    ranked = open_run(s.eval.run)
    ranked.require_rankings("sweep")
    ks = [ranked.resolve_k(k, "--k", allow_zero=True) for k in s.ks]
    scanned, scores, seeds = s.eval.reopen(ranked)
    sets = eval_sets(scanned, list(s.eval.eval_data), s.eval.mask_images, not s.eval.quiet)
    rows = sweep(scanned, sets, ks, seeds, scores, not s.eval.quiet)
    plot = write_sweep_figure(ranked.dir, rows, scanned.cfg.ci_level)
    print(f"removing K heads together for K = {', '.join(map(str, ks))}: the top K by {', '.join(scores)}, against "
          f"K random and the K lowest by {scanned.cfg.score}:")
    print("\n".join(heads_lines(ranked, ks, scores)))
    print(pruning_text(rows, scanned.cfg, seeds))
    print(f"\nresults in {ranked.dir.path('eval/sweep.parquet')}, plot in {plot}")
    return 0
