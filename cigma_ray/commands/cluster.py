"""`cigma-ray cluster render`: KubeRay manifests (a RayJob or RayCluster, with the scan's config as a
ConfigMap) from the same arguments as `cigma-ray scan`, plus the cluster's shape."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import config as config_mod
from ..config import ConfigError
from ..kuberay import (
    CLASSES_KEY,
    CONFIG_DIR,
    CONFIG_KEY,
    RAY_VERSION,
    REMOTE,
    ClusterSettings,
    check,
    render_text,
    worker_memory,
)
from .options import ScanOptions, add_scan_args


def add_arguments(cluster: argparse.ArgumentParser) -> None:
    sub = cluster.add_subparsers(dest="cluster_command", metavar="render", required=True)
    render = sub.add_parser("render", help="print a RayJob (or RayCluster) for a scan, with its config as a ConfigMap",
                            description="Render KubeRay manifests from the same arguments as `cigma-ray scan`, "
                            "plus the cluster's shape. Paths (--data, --out, --checkpoint) are as the pods see "
                            "them: use s3:// URLs, or files baked into the image.")
    k8s = render.add_argument_group("cluster")
    k8s.add_argument("--kind", choices=["rayjob", "raycluster"], default="rayjob",
                     help="a RayJob that runs the scan and deletes its cluster (default), or a long-lived RayCluster")
    k8s.add_argument("--name", default="cigma-scan", help="resource name (DNS-1035; at most 47 characters for a "
                     "RayJob, 53 for a RayCluster; default cigma-scan)")
    k8s.add_argument("--namespace", help="namespace (default: kubectl's current one)")
    k8s.add_argument("--image", required=True, help="the image built from cluster/Dockerfile, e.g. "
                     "registry.example.com/cigma-ray:0.1.0")
    k8s.add_argument("--replicas", type=int, default=1, help="worker pods, one model replica each (default 1; "
                     "the minimum with --max-replicas)")
    k8s.add_argument("--max-replicas", type=int, help="autoscale the workers between --replicas and this")
    k8s.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs per worker pod (default 1; 0 for a CPU cluster)")
    k8s.add_argument("--gpu-type", help="node label value for GPU nodes, e.g. NVIDIA-H100-80GB-HBM3 "
                     "(nvidia.com/gpu.product), or KEY=VALUE for another label")
    k8s.add_argument("--cpus-per-replica", type=int, default=4, help="CPUs per worker pod (default 4)")
    k8s.add_argument("--memory", help="memory per worker pod (default: for an hf: model whose config.json is readable "
                     "here, `cigma-ray plan`'s host memory per replica rounded up to whole GiB; otherwise 32Gi)")
    k8s.add_argument("--secret", default="cigma-ray-s3", help="Secret whose keys become environment variables "
                     "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) on every Ray pod; '' for none (default cigma-ray-s3)")
    k8s.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="more environment variables for the "
                     "job, e.g. AWS_ENDPOINT_URL=http://minio:9000 (never credentials: use --secret)")
    k8s.add_argument("--active-deadline-seconds", type=int, default=86400, help="RayJob: give up after this long "
                     "(default 86400; a resubmitted job resumes)")
    k8s.add_argument("--backoff-limit", type=int, default=2, help="RayJob: retries, each on a new cluster, "
                     "resuming from the run directory (default 2)")
    k8s.add_argument("--ray-version", default=RAY_VERSION, help=f"Ray in the image (default {RAY_VERSION})")
    k8s.add_argument("--output", "-o", help="write here instead of stdout")
    add_scan_args(render.add_argument_group("scan (as for `cigma-ray scan`)"), for_render=True)


@dataclass(frozen=True)
class Settings:
    cluster: ClusterSettings
    scan: ScanOptions
    output: str | None = None


def settings(args: argparse.Namespace) -> Settings:
    """Reject what the operator or the scan would reject later, before anything is written."""
    from ..models import ModelSpec, check_name

    memory = args.memory
    if memory is None:
        memory = worker_memory(args.model, args.precision, args.gpus_per_replica)
        if memory is not None:
            print(f"cigma-ray cluster render: worker pods get {memory} of memory, the plan's host memory per replica "
                  f"of {args.model} (--memory sets another)", file=sys.stderr)
    cluster = ClusterSettings(
        image=args.image, kind=args.kind, name=args.name, namespace=args.namespace, replicas=args.replicas,
        max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica, gpu_type=args.gpu_type,
        cpus_per_replica=args.cpus_per_replica, memory=memory or ClusterSettings.memory, secret=args.secret,
        env=tuple(args.env),
        active_deadline_seconds=args.active_deadline_seconds, backoff_limit=args.backoff_limit,
        ray_version=args.ray_version)
    check(cluster)
    scan = ScanOptions.from_args(args)
    if scan.config:
        config_mod.load(scan.config)
    if scan.model.classes and not Path(scan.model.classes).is_file():
        raise ConfigError(f"--classes {scan.model.classes}: file not found (its lines go into the job's ConfigMap)")
    # an unknown model fails here rather than minutes later in a pod; the rest of the scan's dry run needs the
    # pods' view (an s3:// --out would need s3fs here), so the pods do it themselves
    check_name(ModelSpec(scan.model.model))
    return Settings(cluster, scan, args.output)


def entrypoint(s: Settings) -> list[str]:
    """`cigma-ray scan ... --address auto`, one replica per worker pod (per pod the group may grow to)."""
    c = s.cluster
    replicas = c.max_replicas or c.replicas
    return ["cigma-ray", "scan", *s.scan.to_argv(f"{CONFIG_DIR}/{CONFIG_KEY}", f"{CONFIG_DIR}/{CLASSES_KEY}"),
            "--address", "auto", "--replicas", str(replicas), "--gpus-per-replica", str(c.gpus_per_replica),
            "--cpus-per-replica", str(c.cpus_per_replica)]


def run(s: Settings) -> int:
    files = {key: Path(path).read_text() for key, path in ((CONFIG_KEY, s.scan.config),
                                                           (CLASSES_KEY, s.scan.model.classes)) if path}
    if s.cluster.kind == "rayjob" and not REMOTE.match(s.scan.out):
        print(f"cigma-ray cluster render: warning: --out {s.scan.out} is a path inside the pods; the run directory "
              "goes with the cluster unless it is on object storage (s3://...) or a mounted volume", file=sys.stderr)
    command = ["cigma-ray", "cluster", "render", *s.cluster.to_argv(), *s.scan.to_argv()]
    text = render_text(s.cluster, entrypoint(s), files, command)
    if s.output:
        Path(s.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
