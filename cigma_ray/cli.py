"""The `cigma-ray` command: parse, dispatch to the command's module (commands/), map errors to exit codes.

Exit codes: 0 done; 1 units failed for good (the rest is saved; the same command retries them);
2 bad input (a one-line message naming the input and the fix).
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys

from . import __version__
from .commands import COMMANDS, load_command
from .config import ConfigError
from .data import DataError
from .models import ModelError
from .pipeline import UnitsFailed
from .rundir import RunMismatch, StorageError

USER_ERRORS = (ConfigError, DataError, ModelError, RunMismatch, StorageError)


def command_name(argv: list[str]) -> str | None:
    """The command named on the command line (its first word that is one), if any."""
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` only: other commands' modules are not imported."""
    parser = argparse.ArgumentParser(prog="cigma-ray", description="Find and prune the attention heads that carry a "
                                     "vision model's background shortcut (CIGMA).")
    parser.add_argument("--version", action="version", version=f"cigma-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, info in COMMANDS.items():
        p = sub.add_parser(name, help=info.help, description=info.description)
        if name == command:
            load_command(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = command_name(argv)
    args = build_parser(name if name in COMMANDS else None).parse_args(argv)
    command = load_command(args.command)
    try:
        return command.run(command.settings(args))
    except USER_ERRORS as e:
        print(f"cigma-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except UnitsFailed as e:
        retry = " ".join(shlex.quote(a) for a in ["cigma-ray", *argv])
        print(f"cigma-ray {args.command}: {e}\nthe rest of the run is saved; once the cause is fixed, retry the failed "
              f"units with the same command:\n  {retry}", file=sys.stderr)
        return 1
    finally:
        gc.collect()  # drop Arrow readers while the interpreter is whole, not during its shutdown


if __name__ == "__main__":
    sys.exit(main())
