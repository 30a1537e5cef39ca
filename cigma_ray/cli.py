"""The `cigma-ray` command: scan, show, demo."""
from __future__ import annotations

import argparse
import sys

import yaml

from . import __version__
from .config import ConfigError
from .data import DataError
from .models import ModelError, ModelSpec
from .pipeline import RunMismatch
from .storage import StorageError

USER_ERRORS = (ConfigError, DataError, ModelError, RunMismatch, StorageError)


def parse_kwargs(items: list[str]) -> dict:
    """timm-style `key=value` pairs; values are parsed as YAML scalars (8 -> int, avg -> str)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-kwargs {item!r}: write key=value, e.g. --model-kwargs global_pool=avg depth=6")
        out[key] = yaml.safe_load(value)
    return out


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm:NAME, e.g. timm:vit_base_patch16_224")
    p.add_argument("--checkpoint", help="weights file (PyTorch or safetensors state dict)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: from the checkpoint, else timm's)")
    p.add_argument("--img-size", type=int, help="input size passed to timm.create_model")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="more timm.create_model arguments")
    p.add_argument("--random-weights", action="store_true", help="scan a randomly initialised model (tests, benchmarks)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cigma-ray", description="Find and prune the attention heads that carry a "
                                     "vision model's background shortcut (CIGMA).")
    parser.add_argument("--version", action="version", version=f"cigma-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="predict, select D, learn masks, scan every head, rank")
    add_model_args(scan)
    scan.add_argument("--data", required=True, help="ImageFolder directory or Parquet table")
    scan.add_argument("--out", required=True, help="run directory")
    scan.add_argument("--config", help="YAML file of config keys (see README)")
    scan.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    scan.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    scan.add_argument("--quiet", action="store_true", help="no progress bars")

    show = sub.add_parser("show", help="print the top heads of a run with scores and intervals")
    show.add_argument("run", help="run directory")
    show.add_argument("--top", type=int, help="how many heads (default: the run's top_k)")

    demo = sub.add_parser("demo", help="the whole method on the built-in planted-shortcut benchmark")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def cmd_scan(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .pipeline import Job, Pipeline
    from .report import print_top

    cfg = config_mod.load(args.config)
    spec = ModelSpec(name=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, img_size=args.img_size,
                     model_kwargs=parse_kwargs(args.model_kwargs), random_weights=args.random_weights, seed=cfg.seed)
    job = Job(model=spec, data=args.data, out=args.out, config=cfg, device=check_device(args.device),
              precision=args.precision)
    pipeline = Pipeline(job, progress=not args.quiet)
    pipeline.run_all()
    print_top(pipeline.run, cfg.top_k)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .report import print_top
    from .storage import RunDir

    run = RunDir(args.run)
    if not run.exists("run.json"):
        raise StorageError(f"{args.run} is not a run directory (no run.json); run `cigma-ray scan ... --out {args.run}` first")
    print_top(run, args.top)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"scan": cmd_scan, "show": cmd_show, "demo": cmd_demo}[args.command](args)
    except USER_ERRORS as e:
        print(f"cigma-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
