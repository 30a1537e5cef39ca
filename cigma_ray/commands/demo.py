"""`cigma-ray demo`: the whole method on the built-in planted-shortcut benchmark."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class Settings:
    out: str
    quiet: bool = False


def settings(args: argparse.Namespace) -> Settings:
    return Settings(args.out, args.quiet)


def run(s: Settings) -> int:
    from ..demo import run_demo

    run_demo(s.out, progress=not s.quiet)
    return 0
