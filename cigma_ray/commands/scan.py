"""`cigma-ray scan`: predict, select D, learn masks, scan every head and rank, in this process or on Ray."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .. import config as config_mod
from ..config import Config, ConfigError
from .options import ScanOptions, add_scan_args, check_checkpoint, check_count, check_device, parse_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_scan_args(p)
    p.add_argument("--rounds", type=int, help="iterative mode: after each round remove the top --k-per-round "
                   "heads and scan the rest again on the pruned model (config key rounds; default 1)")
    p.add_argument("--k-per-round", type=int, help="heads removed after each round (config key k_per_round)")
    p.add_argument("--adaptive", action="store_true", default=None, help="adaptive scan: measure heads in rounds "
                   "over a seeded order of D and stop measuring a head once it is surely in or out of the top K; "
                   "with probability >= 1 - delta the top-K set is the exhaustive scan's (config key adaptive)")
    p.add_argument("--delta", type=float, help="the adaptive scan's error probability (config key delta; default 0.05)")
    p.add_argument("--order", choices=["none", "screen"], help="adaptive scan: screen = measure first the heads the "
                   "gradient pre-screen ranks best (it orders the work, never decides; config key adaptive_order)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="check the config and arguments, then stop "
                   "(no model load, no data access, no cluster)")
    p.add_argument("--address", help="run on Ray: local (start Ray here), auto (this machine's cluster), "
                   "HOST:PORT or ray://HOST:PORT; without it everything runs in this process")
    p.add_argument("--replicas", type=int, help="model replicas (default: as many as the cluster fits)")
    p.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default 1)")


@dataclass(frozen=True)
class Settings:
    scan: ScanOptions
    config: Config
    dry_run: bool = False
    address: str | None = None
    replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0


def settings(args: argparse.Namespace) -> Settings:
    """Everything the arguments say by themselves, before any model, data, storage or cluster is touched."""
    from ..rundir import check_out

    cfg = config_mod.load(args.config)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("k_per_round", args.k_per_round),
                                   ("adaptive", args.adaptive), ("delta", args.delta),
                                   ("adaptive_order", args.order)) if v is not None}
    if (args.delta is not None or args.order is not None) and not overrides.get("adaptive", cfg.adaptive):
        raise ConfigError("--delta and --order are settings of the adaptive scan: add --adaptive (or adaptive: true "
                          "in the config)")
    scan = ScanOptions.from_args(args)
    if not args.dry_run:  # a dry run reads no files (it checks a pod's command line, whose paths are the pod's)
        check_out(args.out)  # an existing file: refused before the model loads
        check_checkpoint(args.checkpoint)
    if not scan.model.model.startswith("hf:"):  # an hf: directory is read when the scan starts (it may be on S3)
        from ..models import ModelSpec, check_name

        check_name(ModelSpec(scan.model.model, model_kwargs=parse_kwargs(scan.model.model_kwargs),
                             img_size=scan.model.img_size))
    check_count(args.replicas, "--replicas", what="model replicas, a count")
    for value, flag in ((args.cpus_per_replica, "--cpus-per-replica"), (args.gpus_per_replica, "--gpus-per-replica")):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} {value}: give a number of 0 or more (fractions share a device)")
    if args.cpus_per_replica is not None and args.cpus_per_replica <= 0 and not args.gpus_per_replica:
        raise ConfigError(f"--cpus-per-replica {args.cpus_per_replica}: a replica without GPUs needs CPUs (e.g. 1)")
    if args.address is not None:
        from ..distributed import address_parts

        address_parts(args.address)  # the spelling only; whether anyone listens is checked before the model loads
    else:
        check_device(args.device or "cpu")  # in this process: CUDA must be here (on Ray, the replicas' GPUs count)
    return Settings(scan=scan, config=cfg.replace(**overrides) if overrides else cfg,
                    dry_run=args.dry_run, address=args.address, replicas=args.replicas,
                    gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)


def run(s: Settings) -> int:
    import contextlib

    from ..pipeline import Job, Pipeline
    from ..reports.run import top_heads_text
    from ..rundir import open_run

    spec = s.scan.model.spec(s.config.seed)
    if s.dry_run:
        return dry_run(s, spec)
    scan = s.scan
    if s.address is None:
        job = Job(model=spec, data=scan.data, out=scan.out, config=s.config, device=scan.device or "cpu",
                  precision=replica_precision(s, spec))
        Pipeline(job, progress=not scan.quiet).run_all()
    else:
        from ..distributed import check_address, ray_executor, ray_session

        check_address(s.address)
        with contextlib.ExitStack() as session:
            if scan.precision is None and s.gpus_per_replica is None and spec.family == "hf":
                session.enter_context(ray_session(s.address))  # whether replicas get GPUs decides the precision
            precision = replica_precision(s, spec)
            # the driver only validates: a vision-language model without its weights ("meta"), a timm model on
            # its CPU; replicas use --device, or CUDA when they hold GPUs
            job = Job(model=spec, data=scan.data, out=scan.out, config=s.config, device=scan.device or "cpu",
                      precision=precision)
            pipeline = Pipeline(job, progress=not scan.quiet, load_device="meta")
            with ray_executor(pipeline.job, s.address, s.replicas, s.cpus_per_replica, s.gpus_per_replica) as executor:
                pipeline.run_all(executor)
    print(top_heads_text(open_run(scan.out)))
    return 0


def replica_precision(s: Settings, spec) -> str:
    """--precision, or its default where the replicas run (engine.memory.default_precision): bf16 for an hf:
    model on GPUs, fp32 otherwise. On Ray without --gpus-per-replica, replicas get GPUs when the cluster has
    any, so for an hf: model this asks the cluster (connected by then)."""
    from ..engine.memory import default_precision

    if s.scan.precision:
        return s.scan.precision
    device = s.scan.device or "cpu"
    if s.address is not None:
        gpus = s.gpus_per_replica
        if gpus is None and spec.family == "hf":
            from ..distributed import cluster_has_gpus

            gpus = 1.0 if cluster_has_gpus() else 0.0
        if gpus:
            device = "cuda"
    return default_precision(spec.name, device)


def dry_run(s: Settings, spec) -> int:
    """Everything that can be checked without weights, data or a cluster (manifests use this)."""
    from ..distributed import address_parts
    from ..models import check_name
    from ..rundir import RunDir

    check_name(spec)
    RunDir(s.scan.out)  # the URL's scheme has a filesystem
    if s.address is not None:
        address_parts(s.address)
    print(f"ok: would scan {spec.name} on {s.scan.data} into {s.scan.out}"
          + (f" on Ray at {s.address}" if s.address else " in this process"))
    return 0
