"""The `cigma-ray` command: scan, show, status, demo, prune, sweep, export, report, bench, cluster."""
from __future__ import annotations

import argparse
import gc
import shlex
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
    p.add_argument("--model", required=True, help="timm:NAME (e.g. timm:vit_base_patch16_224), or hf:DIR for a "
                   "transformers CLIP, LLaVA, LLaVA-NeXT or InternVL directory (or an s3://... copy of one)")
    p.add_argument("--checkpoint", help="weights file (PyTorch or safetensors state dict)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: from the checkpoint, else timm's)")
    p.add_argument("--img-size", type=int, help="input size passed to timm.create_model")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="more timm.create_model arguments")
    p.add_argument("--random-weights", action="store_true", help="scan a randomly initialised model (tests, benchmarks)")
    p.add_argument("--classes", metavar="FILE", help="hf: class names, one per line in label order (default: the "
                   "data's class folder names)")
    p.add_argument("--prompt", action="append", default=[], help="hf: a CLIP prompt template with {} (repeat for "
                   "an ensemble; default 'a photo of a {}.'), or a VLM's question with {classes}")
    p.add_argument("--heads", default="vision", choices=["vision", "vision+text"], help="hf: the heads to scan "
                   "(a VLM's vision encoder, or also its language model; default vision)")
    p.add_argument("--scoring", default="sequence", choices=["sequence", "first"], help="hf VLM: a class's logit is "
                   "the summed log-probability of its answer tokens, or of its first token only (default sequence)")


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
    scan.add_argument("--device", help="cpu or cuda[:N] (default cpu; on Ray, cuda for replicas that hold GPUs)")
    scan.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    scan.add_argument("--rounds", type=int, help="iterative mode: after each round remove the top --k-per-round "
                      "heads and scan the rest again on the pruned model (config key rounds; default 1)")
    scan.add_argument("--k-per-round", type=int, help="heads removed after each round (config key k_per_round)")
    scan.add_argument("--quiet", action="store_true", help="no progress bars")
    scan.add_argument("--dry-run", action="store_true", help="check the config and arguments, then stop "
                      "(no model load, no data access, no cluster)")
    scan.add_argument("--address", help="run on Ray: local (start Ray here), auto (this machine's cluster), "
                      "HOST:PORT or ray://HOST:PORT; without it everything runs in this process")
    scan.add_argument("--replicas", type=int, help="model replicas (default: as many as the cluster fits)")
    scan.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)")
    scan.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default 1)")

    status = sub.add_parser("status", help="what a run has finished, what is missing and what failed")
    status.add_argument("run", help="run directory")

    show = sub.add_parser("show", help="print the top heads of a run with scores and intervals")
    show.add_argument("run", help="run directory")
    show.add_argument("--top", type=int, help="how many heads (default: the run's top_k)")
    show.add_argument("--score", help="rank by this score instead of the run's: big_drop, bir_drop or big_minus_fig "
                      "(the last two when the scan measured FIG^(-h))")

    demo = sub.add_parser("demo", help="the whole method on the built-in planted-shortcut benchmark")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    bench = sub.add_parser("bench", help="forward, paper-style loop, engine scan and mask stage rates, measured "
                           "together on random weights; saves JSON and a PNG plot",
                           description="Defaults depend on --device: on cpu, vit_tiny_patch16_224 in fp32; on cuda, "
                           "vit_base_patch16_224 and vit_large_patch16_224 in bf16. Progress goes to stderr, the "
                           "table to stdout.")
    bench.add_argument("--model", nargs="+", metavar="NAME", help="timm model names (timm: prefix optional)")
    bench.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--precision", choices=["fp32", "bf16"], help="default fp32 on cpu, bf16 on cuda")
    bench.add_argument("--images", type=int, help="images per scan (default 6 on cpu, 64 on cuda)")
    bench.add_argument("--batch-sizes", metavar="B1,B2,...", help="batch sizes of the forward and engine sweeps "
                       "(default 1,8,32 on cpu; 32,64,128,256,512 on cuda)")
    bench.add_argument("--mask-steps", type=int, help="mask steps timed (default 5 on cpu, 10 on cuda)")
    bench.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up, each measurement once "
                       "per round in turn; each keeps its best (default 3)")
    bench.add_argument("--img-size", type=int, help="input size passed to timm.create_model")
    bench.add_argument("--results", default="benchmarks/results", help="folder for the JSON and PNG, relative to "
                       "the current directory (default benchmarks/results)")
    bench.add_argument("--no-bf16-check", action="store_true", help="skip the bf16 vs fp32 top-k comparison")
    from .cluster import add_cluster_parser
    add_cluster_parser(sub)
    from .export import add_export_parser
    add_export_parser(sub)
    from .report_html import add_report_parser
    add_report_parser(sub)
    from .prune import add_prune_parsers
    add_prune_parsers(sub)
    from .plan import add_plan_parser
    add_plan_parser(sub)
    return parser


def cmd_scan(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .pipeline import Job, Pipeline
    from .report import print_top

    cfg = config_mod.load(args.config)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("k_per_round", args.k_per_round)) if v is not None}
    cfg = cfg.replace(**overrides) if overrides else cfg
    spec = ModelSpec(name=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, img_size=args.img_size,
                     model_kwargs=parse_kwargs(args.model_kwargs), random_weights=args.random_weights, seed=cfg.seed,
                     heads=args.heads, classes=read_classes(args.classes), prompts=tuple(args.prompt),
                     scoring=args.scoring)
    if args.dry_run:
        dry_run(args, spec)
        return 0
    if args.address is None:
        job = Job(model=spec, data=args.data, out=args.out, config=cfg, device=check_device(args.device or "cpu"),
                  precision=args.precision)
        pipeline = Pipeline(job, progress=not args.quiet)
        pipeline.run_all()
    else:
        from .distributed import check_address, run_on_ray

        check_address(args.address)
        # the driver only validates: a vision-language model without its weights ("meta"), a timm model on
        # its CPU; replicas use --device, or CUDA when they hold GPUs
        job = Job(model=spec, data=args.data, out=args.out, config=cfg, device=args.device or "cpu",
                  precision=args.precision)
        pipeline = Pipeline(job, progress=not args.quiet, load_device="meta")
        run_on_ray(pipeline, args.address, args.replicas, args.cpus_per_replica, args.gpus_per_replica)
    print_top(pipeline.run)
    return 0


def read_classes(path: str | None) -> tuple[str, ...]:
    """Class names from a file, one per line (blank lines skipped); the names, not the path, go into the spec."""
    if path is None:
        return ()
    try:
        with open(path) as f:
            names = tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise ConfigError(f"--classes {path}: {e.strerror}") from None
    if not names:
        raise ConfigError(f"--classes {path}: no class names in it (one per line)")
    return names


def dry_run(args: argparse.Namespace, spec: ModelSpec) -> None:
    """Everything that can be checked without weights, data or a cluster (manifests use this)."""
    from .distributed.executor import address_parts
    from .models.loader import LOADERS
    from .storage import RunDir

    if spec.family not in LOADERS:
        raise ModelError(f"--model {spec.name!r}: unknown model family {spec.family!r}; use timm:NAME")
    if spec.family == "timm":
        import timm

        if not timm.is_model(spec.arch):
            raise ModelError(f"--model {spec.name!r}: timm has no model {spec.arch!r}")
    RunDir(args.out)  # the URL's scheme has a filesystem
    if args.address is not None:
        address_parts(args.address)
    print(f"ok: would scan {spec.name} on {args.data} into {args.out}"
          + (f" on Ray at {args.address}" if args.address else " in this process"))


def cmd_status(args: argparse.Namespace) -> int:
    from .report import print_status

    print_status(open_run(args.run))
    return 0


def open_run(url: str):
    from .storage import RunDir

    run = RunDir(url)
    run.check(label="run")
    if not run.exists("run.json"):
        raise StorageError(f"{url} is not a run directory (no run.json); run `cigma-ray scan ... --out {url}` first")
    return run


def cmd_show(args: argparse.Namespace) -> int:
    from .report import print_top

    print_top(open_run(args.run), args.top, args.score)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, progress=not args.quiet)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_command

    return run_command(args)


def main(argv: list[str] | None = None) -> int:
    from .pipeline import UnitsFailed

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    commands = {"scan": cmd_scan, "show": cmd_show, "status": cmd_status, "demo": cmd_demo, "bench": cmd_bench,
                "cluster": lambda a: a.func(a), "export": lambda a: a.func(a),
                "report": lambda a: a.func(a), "prune": lambda a: a.func(a), "sweep": lambda a: a.func(a),
                "plan": lambda a: a.func(a)}
    try:
        return commands[args.command](args)
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
