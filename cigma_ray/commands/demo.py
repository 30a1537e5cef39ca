"""`cigma-ray demo`: the whole method on a built-in planted-shortcut benchmark (shapes, or scenes)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run directory (default runs/demo, runs/scenes for --benchmark scenes)")
    p.add_argument("--benchmark", default="shapes", choices=["shapes", "scenes"],
                   help="shapes (the default: flat shapes on flat colours, a ViT trained from scratch) or scenes "
                        "(articulated, patterned objects in procedural scenes, a pretrained and fine-tuned ViT)")
    p.add_argument("--reduced", action="store_true", help="scenes: its small form (64 images per split; for CI)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class Settings:
    out: str
    benchmark: str = "shapes"
    reduced: bool = False
    quiet: bool = False


def settings(args: argparse.Namespace) -> Settings:
    from ..config import ConfigError

    if args.reduced and args.benchmark != "scenes":
        raise ConfigError("--reduced is for --benchmark scenes (the shapes benchmark has one size)")
    out = args.out or ("runs/demo" if args.benchmark == "shapes" else f"runs/{args.benchmark}")
    return Settings(out, args.benchmark, args.reduced, args.quiet)


def run(s: Settings) -> int:
    from ..demo import run_demo

    run_demo(s.out, progress=not s.quiet, name=s.benchmark, reduced=s.reduced)
    return 0
