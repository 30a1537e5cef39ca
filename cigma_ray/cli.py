"""The `cigma-ray` command: parse, dispatch to the command's module (commands/), map errors to exit codes.

Exit codes: 0 done; 1 units failed for good, or storage failed (the rest is saved; the same command retries);
2 bad input (a one-line message naming the input and the fix); 130 interrupted (Ctrl-C; the same command
resumes).
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys

from . import __version__
from .commands import COMMANDS, load_command

RESUMES = {"scan", "demo"}  # commands whose finished units survive an interruption


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


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input: a message, exit 2 (imported here, so that Ctrl-C during imports is caught)."""
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .rundir import RunMismatch, StorageError

    return ConfigError, DataError, ModelError, RunMismatch, StorageError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = command_name(argv)
    try:
        return dispatch(argv, name)
    except KeyboardInterrupt:
        what = ("finished units are kept: run the same command again to resume" if name in RESUMES else
                "files are written whole, so nothing is half-written: run the same command again")
        print(f"\ncigma-ray{f' {name}' if name in COMMANDS else ''}: interrupted; {what}", file=sys.stderr)
        return 130


def dispatch(argv: list[str], name: str | None) -> int:
    args = build_parser(name if name in COMMANDS else None).parse_args(argv)
    command = load_command(args.command)
    from .pipeline import UnitsFailed

    errors = user_errors()
    try:
        return command.run(command.settings(args))
    except errors as e:
        print(f"cigma-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except UnitsFailed as e:
        retry = " ".join(shlex.quote(a) for a in ["cigma-ray", *argv])
        print(f"cigma-ray {args.command}: {e}\nthe rest of the run is saved; once the cause is fixed, retry the failed "
              f"units with the same command:\n  {retry}", file=sys.stderr)
        return 1
    except OSError as e:  # storage that failed under us (a read after retries, a full disk): not the input's fault
        print(f"cigma-ray {args.command}: storage error: {type(e).__name__}: {e}\nfinished work is kept; once the "
              "cause is fixed, run the same command again", file=sys.stderr)
        return 1
    finally:
        gc.collect()  # drop Arrow readers while the interpreter is whole, not during its shutdown


if __name__ == "__main__":
    sys.exit(main())
