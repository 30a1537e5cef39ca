"""`cigma-ray report RUN`: one self-contained HTML page of a run (PNG plots embedded, also saved beside it)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..config import ConfigError
from .options import add_run_arg, check_checkpoint, check_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p)
    p.add_argument("--k", type=int, help="heads in the top K (default: the run's top_k)")
    p.add_argument("--images", type=int, default=4, help="images of D shown with their masks (default 4)")
    p.add_argument("--device", default="cpu", help="device for the per-image panels (default cpu)")
    p.add_argument("--checkpoint", help="the scanned weights, when the file has moved since the scan")


@dataclass(frozen=True)
class Settings:
    run: str
    k: int | None = None
    images: int = 4
    device: str = "cpu"
    checkpoint: str | None = None


def settings(args: argparse.Namespace) -> Settings:
    if args.images < 0:
        raise ConfigError(f"--images {args.images}: give a count of 0 or more")
    check_checkpoint(args.checkpoint)
    return Settings(args.run, args.k, args.images, check_device(args.device), args.checkpoint)


def run(s: Settings) -> int:
    from ..evaluation.inspection import image_panels, stability
    from ..reports.html import write_report
    from ..rundir import open_run

    ranked = open_run(s.run)
    ranked.require_rankings("report")
    k = ranked.resolve_k(s.k)
    panels = image_panels(ranked.reopen(s.device, s.checkpoint), ranked.top_heads(k), s.images) if s.images else None
    print(f"report: {write_report(ranked, k, stability(ranked, k), panels)}")
    return 0
