"""`cigma-ray prune RUN`: remove the top K heads together, against K random and the K lowest-scored heads;
with --auto-k, choose the score and K on held-out images under a guard on clean accuracy."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..config import OBJECTIVES, ConfigError
from .options import AUTO_K_MASK_IMAGES, EvalOptions, add_eval_args, add_run_arg, parse_ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p, "run directory with a rankings.parquet")
    p.add_argument("--k", type=int, help="heads to remove (default: the run's top_k)")
    p.add_argument("--auto-k", action="store_true", help="choose the score and K on held-out images: the largest "
                   "gain in --objective with clean accuracy dropping by at most --max-clean-drop, better than K random "
                   "heads; prints the trade-off table, writes eval/auto-k.parquet and eval/auto-k.json")
    p.add_argument("--objective", choices=OBJECTIVES, help="with --auto-k: raise counterfactual conflict accuracy "
                   "(conflict: held-out foregrounds over other classes' backgrounds, the gain's paired interval above "
                   "0) or lower mean BIR (bir) (default: config key objective, conflict)")
    p.add_argument("--max-clean-drop", type=float, metavar="F", help="with --auto-k: the most clean accuracy "
                   "(on correctly classified held-out images) a pruning may cost (default: config key "
                   "max_clean_drop, 0.02)")
    p.add_argument("--k-grid", metavar="K1,K2,...", help="with --auto-k: the K values to try (default 1, 2, 4, ... "
                   "up to half the heads)")
    add_eval_args(p)


@dataclass(frozen=True)
class Settings:
    eval: EvalOptions
    k: int | None = None
    auto_k: bool = False
    max_clean_drop: float | None = None
    k_grid: tuple[int, ...] | None = None
    objective: str | None = None


def settings(args: argparse.Namespace) -> Settings:
    if not args.auto_k and (args.objective is not None or args.max_clean_drop is not None or args.k_grid is not None):
        raise ConfigError("--objective, --max-clean-drop and --k-grid go with --auto-k")
    if args.auto_k:
        if args.k is not None:
            raise ConfigError("--auto-k chooses K itself; give the K values to try with --k-grid, not --k")
        if args.eval_data and len(args.eval_data) > 1:
            raise ConfigError("--auto-k judges on one held-out data set: give --eval-data once (default: the scan's "
                              "images outside D)")
        if args.max_clean_drop is not None and not 0 <= args.max_clean_drop <= 1:
            raise ConfigError(f"--max-clean-drop {args.max_clean_drop}: a fraction of accuracy in [0, 1], e.g. 0.02")
    grid = None if args.k_grid is None else tuple(k for k in parse_ks(args.k_grid) if k > 0)
    return Settings(EvalOptions.from_args(args, AUTO_K_MASK_IMAGES if args.auto_k else None), args.k, args.auto_k,
                    args.max_clean_drop, grid, args.objective)


def run(s: Settings) -> int:
    from ..evaluation import eval_sets, prune
    from ..reports.pruning import heads_lines, pruning_text
    from ..rundir import open_run

    ranked = open_run(s.eval.run)
    ranked.require_rankings("prune")
    if s.auto_k:
        return run_auto_k(s, ranked)
    k = ranked.resolve_k(s.k)
    scanned, scores, seeds = s.eval.reopen(ranked)
    sets = eval_sets(scanned, list(s.eval.eval_data), s.eval.mask_images, not s.eval.quiet)
    rows = prune(scanned, sets, k, seeds, scores, not s.eval.quiet)
    print(f"removing {k} heads together, the top by {', '.join(scores)}, against {k} random heads and the {k} "
          f"lowest by {scanned.cfg.score}:")
    print("\n".join(heads_lines(ranked, [k], scores)))
    print(pruning_text(rows, scanned.cfg, seeds))
    print(f"\nresults in {ranked.dir.path(f'eval/prune-k{k}.parquet')}")
    return 0


def run_auto_k(s: Settings, ranked) -> int:
    from ..evaluation import auto_k, default_k_grid, heldout_set
    from ..reports.pruning import auto_k_text

    ks = default_k_grid(ranked.n_heads) if s.k_grid is None else list(s.k_grid)
    for k in ks:
        ranked.resolve_k(k, "--k-grid")
    scanned, scores, seeds = s.eval.reopen(ranked)
    max_drop = scanned.cfg.max_clean_drop if s.max_clean_drop is None else s.max_clean_drop
    objective = s.objective or scanned.cfg.objective
    data = heldout_set(scanned, s.eval.eval_data[0] if s.eval.eval_data else None, s.eval.mask_images,
                       not s.eval.quiet, swaps=objective == "conflict")
    print(f"choosing the score and K on held-out images, K in {', '.join(map(str, ks))}, scores {', '.join(scores)}, "
          f"objective {objective}:")
    result = auto_k(scanned, data, ks, seeds, scores, max_drop, not s.eval.quiet, objective)
    print(auto_k_text(result, data, scanned.cfg))
    if result.choice["k"]:
        print(f"\nto export it: cigma-ray export {s.eval.run} --k {result.choice['k']} --score "
              f"{result.choice['score']} --out pruned.pth")
    print(f"results in {ranked.dir.path('eval/auto-k.parquet')} and {ranked.dir.path('eval/auto-k.json')}")
    return 0
