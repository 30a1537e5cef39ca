"""`cigma-ray scan`: predict, select D, learn masks, scan every head and rank, in this process or on Ray."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .. import config as config_mod
from ..config import Config, ConfigError
from .options import ScanOptions, add_scan_args, check_device


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
    cfg = config_mod.load(args.config)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("k_per_round", args.k_per_round),
                                   ("adaptive", args.adaptive), ("delta", args.delta),
                                   ("adaptive_order", args.order)) if v is not None}
    if (args.delta is not None or args.order is not None) and not overrides.get("adaptive", cfg.adaptive):
        raise ConfigError("--delta and --order are settings of the adaptive scan: add --adaptive (or adaptive: true "
                          "in the config)")
    return Settings(scan=ScanOptions.from_args(args), config=cfg.replace(**overrides) if overrides else cfg,
                    dry_run=args.dry_run, address=args.address, replicas=args.replicas,
                    gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)


def run(s: Settings) -> int:
    from ..pipeline import Job, Pipeline
    from ..reports.run import top_heads_text
    from ..rundir import open_run

    spec = s.scan.model.spec(s.config.seed)
    if s.dry_run:
        return dry_run(s, spec)
    scan = s.scan
    if s.address is None:
        job = Job(model=spec, data=scan.data, out=scan.out, config=s.config, device=check_device(scan.device or "cpu"),
                  precision=scan.precision)
        Pipeline(job, progress=not scan.quiet).run_all()
    else:
        from ..distributed import check_address, ray_executor

        check_address(s.address)
        # the driver only validates: a vision-language model without its weights ("meta"), a timm model on
        # its CPU; replicas use --device, or CUDA when they hold GPUs
        job = Job(model=spec, data=scan.data, out=scan.out, config=s.config, device=scan.device or "cpu",
                  precision=scan.precision)
        pipeline = Pipeline(job, progress=not scan.quiet, load_device="meta")
        with ray_executor(pipeline.job, s.address, s.replicas, s.cpus_per_replica, s.gpus_per_replica) as executor:
            pipeline.run_all(executor)
    print(top_heads_text(open_run(scan.out)))
    return 0


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
