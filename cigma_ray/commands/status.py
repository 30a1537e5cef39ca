"""`cigma-ray status RUN`: what a run has finished, what is missing and what failed."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .options import add_run_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p)


@dataclass(frozen=True)
class Settings:
    run: str


def settings(args: argparse.Namespace) -> Settings:
    return Settings(args.run)


def run(s: Settings) -> int:
    from ..pipeline import run_status
    from ..reports.run import status_text
    from ..rundir import open_run

    run_dir = open_run(s.run).dir
    print(status_text(run_dir, run_status(run_dir)))
    return 0
