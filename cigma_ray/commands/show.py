"""`cigma-ray show RUN`: the run's summary and its top heads with scores and intervals."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .options import add_run_arg, check_count


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p)
    p.add_argument("--top", type=int, help="how many heads (default: the run's top_k)")
    p.add_argument("--score", help="rank by this score instead of the run's: big_drop, bir_drop, big_minus_fig "
                   "(when the scan measured FIG^(-h)) or swap_drop (when it measured SWAP^(-h))")


@dataclass(frozen=True)
class Settings:
    run: str
    top: int | None = None
    score: str | None = None


def settings(args: argparse.Namespace) -> Settings:
    check_count(args.top, "--top", what="heads to print, a count")
    return Settings(args.run, args.top, args.score)


def run(s: Settings) -> int:
    from ..reports.run import top_heads_text
    from ..rundir import open_run

    ranked = open_run(s.run)
    ranked.require_rankings("show")
    print(top_heads_text(ranked, s.top, s.score))
    return 0
