"""`cigma-ray cluster render`: KubeRay manifests (ray.io/v1) from the scan a user runs locally.

One builder makes both the manifests shipped in `cluster/kuberay/` and the ones users render,
so the scan config stays the single source of truth: the config file's content becomes a
ConfigMap mounted on every Ray pod, and the job's entrypoint is the same `cigma-ray scan`
command with `--address auto` and the config path pointing at the mount.

A "replica" means the same thing here as in `cigma-ray scan`: one model replica, and the
render gives each its own worker pod (`--gpus-per-replica` GPUs, `--cpus-per-replica` CPUs),
so the scan's replica count and the pods always agree. With `--max-replicas` the worker group
autoscales: the scan asks for that many replicas, the ones without a pod wait, and their
pending resource demand is what makes the autoscaler add pods.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import yaml

from . import __version__
from .cli import add_model_args, parse_kwargs
from .config import ConfigError, load

RAY_VERSION = "2.60.0"  # the Ray that cluster/Dockerfile installs; KubeRay gates features on it
CONFIG_DIR = "/config"
CONFIG_KEY = "scan.yaml"
CLASSES_KEY = "classes.txt"  # an hf model's --classes file, mounted beside the config
ENTRYPOINT_ANNOTATION = "cigma-ray/entrypoint"  # RayCluster: the scan command to run on it
NAME_LIMITS = {"rayjob": 47, "raycluster": 53}  # what the KubeRay operator admits
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")  # DNS-1123 label: namespaces
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?\Z")
CREDENTIAL_VARS = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|KEY_ID)", re.I)
REMOTE = re.compile(r"[a-z][a-z0-9+.-]*://")
USER_ID = 10001  # the non-root user of cluster/Dockerfile
HEAD_CPUS, HEAD_MEMORY = "4", "16Gi"  # the head runs the scan driver, which loads the model once on CPU


def add_cluster_parser(subparsers) -> None:
    """Register `cluster render` on the `cigma-ray` sub-command parser."""
    cluster = subparsers.add_parser("cluster", help="Kubernetes (KubeRay) manifests for a scan")
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
    k8s.add_argument("--memory", default="32Gi", help="memory per worker pod (default 32Gi)")
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
    scan = render.add_argument_group("scan (as for `cigma-ray scan`)")
    add_model_args(scan)
    scan.add_argument("--data", required=True, help="ImageFolder or Parquet, as the pods see it (e.g. s3://...)")
    scan.add_argument("--out", required=True, help="run directory, as the pods see it (e.g. s3://bucket/runs/x)")
    scan.add_argument("--config", help="YAML file of config keys; its content goes into a ConfigMap")
    scan.add_argument("--device", help="passed to the scan (replicas with GPUs use CUDA anyway)")
    scan.add_argument("--precision", choices=["fp32", "bf16"], help="passed to the scan (default fp32)")
    scan.add_argument("--quiet", action="store_true", help="passed to the scan: no progress bars in the logs")
    render.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace) -> int:
    text = render_text(args)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# -- the scan command ----------------------------------------------------------------------
def model_args(args: argparse.Namespace, classes_path: str | None) -> list[str]:
    """The model options of the scan; a --classes file is read at `classes_path`."""
    out = ["--model", args.model]
    if args.checkpoint:
        out += ["--checkpoint", args.checkpoint]
    if args.num_classes is not None:
        out += ["--num-classes", str(args.num_classes)]
    if args.img_size is not None:
        out += ["--img-size", str(args.img_size)]
    if args.model_kwargs:
        out += ["--model-kwargs", *args.model_kwargs]
    if args.random_weights:
        out.append("--random-weights")
    if args.classes:
        out += ["--classes", classes_path]
    for prompt in args.prompt:
        out += ["--prompt", prompt]
    if args.heads != "vision":
        out += ["--heads", args.heads]
    if args.scoring != "sequence":
        out += ["--scoring", args.scoring]
    return out


def scan_args(args: argparse.Namespace, config_path: str | None, classes_path: str | None) -> list[str]:
    """The user's own scan arguments, with the config file at `config_path` and the classes file at `classes_path`."""
    out = [*model_args(args, classes_path), "--data", args.data, "--out", args.out]
    if args.config:
        out += ["--config", config_path]
    if args.device:
        out += ["--device", args.device]
    if args.precision:
        out += ["--precision", args.precision]
    if args.quiet:
        out.append("--quiet")
    return out


def entrypoint_argv(args: argparse.Namespace, config_path: str = f"{CONFIG_DIR}/{CONFIG_KEY}",
                    classes_path: str = f"{CONFIG_DIR}/{CLASSES_KEY}") -> list[str]:
    """`cigma-ray scan ... --address auto`, one replica per worker pod (per pod the group may grow to)."""
    replicas = args.max_replicas or args.replicas
    return ["cigma-ray", "scan", *scan_args(args, config_path, classes_path), "--address", "auto", "--replicas", str(replicas),
            "--gpus-per-replica", str(args.gpus_per_replica), "--cpus-per-replica", str(args.cpus_per_replica)]


def render_argv(args: argparse.Namespace) -> list[str]:
    """The render command that reproduces this output (written at its top)."""
    out = ["cigma-ray", "cluster", "render", "--kind", args.kind, "--name", args.name]
    if args.namespace:
        out += ["--namespace", args.namespace]
    out += ["--image", args.image, "--replicas", str(args.replicas)]
    if args.max_replicas:
        out += ["--max-replicas", str(args.max_replicas)]
    out += ["--gpus-per-replica", str(args.gpus_per_replica)]
    if args.gpu_type:
        out += ["--gpu-type", args.gpu_type]
    out += ["--cpus-per-replica", str(args.cpus_per_replica), "--memory", args.memory, "--secret", args.secret]
    if args.env:
        out += ["--env", *args.env]
    if args.kind == "rayjob":
        out += ["--active-deadline-seconds", str(args.active_deadline_seconds), "--backoff-limit", str(args.backoff_limit)]
    if args.ray_version != RAY_VERSION:
        out += ["--ray-version", args.ray_version]
    return out + scan_args(args, args.config, args.classes)


# -- checks --------------------------------------------------------------------------------
def check(args: argparse.Namespace) -> dict[str, str]:
    """Reject what the operator or the scan would reject later; returns the job's env vars."""
    limit = NAME_LIMITS[args.kind]
    if not DNS_1035.match(args.name) or len(args.name) > limit:
        raise ConfigError(f"--name {args.name!r}: a {args.kind} name must be at most {limit} characters of lower-case "
                          "letters, digits and '-', starting with a letter and ending with a letter or digit")
    if args.namespace is not None and not (DNS_LABEL.match(args.namespace) and len(args.namespace) <= 63):
        raise ConfigError(f"--namespace {args.namespace!r}: not a valid namespace name")
    if args.secret and not DNS_1123.match(args.secret):
        raise ConfigError(f"--secret {args.secret!r}: not a valid Secret name")
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: needs at least one worker pod (the head runs no replica)")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise ConfigError(f"--max-replicas {args.max_replicas}: must be at least --replicas {args.replicas}")
    if args.gpus_per_replica < 0 or args.cpus_per_replica < 1:
        raise ConfigError("--gpus-per-replica must be >= 0 and --cpus-per-replica >= 1 (whole GPUs and CPUs per pod)")
    if args.gpu_type and not args.gpus_per_replica:
        raise ConfigError("--gpu-type needs --gpus-per-replica of at least 1")
    if not QUANTITY.match(args.memory):
        raise ConfigError(f"--memory {args.memory!r}: use a Kubernetes quantity such as 32Gi")
    if args.active_deadline_seconds < 1 or args.backoff_limit < 0:
        raise ConfigError("--active-deadline-seconds must be >= 1 and --backoff-limit >= 0")
    # log lines reach `kubectl logs` as they are printed; progress bars update twice a minute there
    env = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item!r}: write KEY=VALUE, e.g. --env AWS_ENDPOINT_URL=http://minio:9000")
        if CREDENTIAL_VARS.search(key):
            raise ConfigError(f"--env {key}: credentials never go into a manifest; put them in the Secret named by --secret")
        env[key] = value
    parse_kwargs(args.model_kwargs)
    if args.config:
        load(args.config)
    if args.classes and not Path(args.classes).is_file():
        raise ConfigError(f"--classes {args.classes}: file not found (its lines go into the job's ConfigMap)")
    check_model(args.model)
    return env


def check_model(name: str) -> None:
    """An unknown model fails here rather than minutes later in a pod. The rest of the scan's dry
    run needs the pods' view (an s3:// --out would need s3fs here), so the pods do it themselves."""
    from .cli import dry_run
    from .models import ModelSpec

    with contextlib.redirect_stdout(io.StringIO()):
        dry_run(argparse.Namespace(out=".", data="", address=None), ModelSpec(name))


def node_selector(gpu_type: str | None) -> dict[str, str]:
    if not gpu_type:
        return {}
    key, sep, value = gpu_type.partition("=")
    return {key: value} if sep else {"nvidia.com/gpu.product": gpu_type}


# -- the manifests -------------------------------------------------------------------------
def pod_template(args: argparse.Namespace, role: str, resources: dict[str, str], config_map: str | None) -> dict:
    """A Ray pod: the image, the credential Secret, the config mount, shared memory, non-root."""
    container = {"name": f"ray-{role}", "image": args.image}
    if args.secret:
        container["envFrom"] = [{"secretRef": {"name": args.secret}}]
    container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]  # Ray's object store; the default 64 MiB is too small
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if config_map:
        mounts.append({"name": "scan-config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "scan-config", "configMap": {"name": config_map}})
    container["volumeMounts"] = mounts
    spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID}}
    if role == "worker" and args.gpus_per_replica:
        if args.gpu_type:
            spec["nodeSelector"] = node_selector(args.gpu_type)
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec["containers"] = [container]
    spec["volumes"] = volumes
    return {"spec": spec}


def ray_cluster_spec(args: argparse.Namespace, config_map: str | None) -> dict:
    worker = {"cpu": str(args.cpus_per_replica), "memory": args.memory}
    if args.gpus_per_replica:
        worker["nvidia.com/gpu"] = str(args.gpus_per_replica)
    spec = {"rayVersion": args.ray_version}
    if args.max_replicas:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 120}
    spec["headGroupSpec"] = {
        "serviceType": "ClusterIP",  # the dashboard stays inside the cluster: reach it with kubectl port-forward
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},  # no replica on the head
        "template": pod_template(args, "head", {"cpu": HEAD_CPUS, "memory": HEAD_MEMORY}, config_map),
    }
    spec["workerGroupSpecs"] = [{
        "groupName": "gpu" if args.gpus_per_replica else "cpu",
        "replicas": args.replicas,
        "minReplicas": args.replicas,
        "maxReplicas": args.max_replicas or args.replicas,
        "rayStartParams": {},
        "template": pod_template(args, "worker", worker, config_map),
    }]
    return spec


def render(args: argparse.Namespace) -> list[dict]:
    """The manifests: the config's ConfigMap (if any), then the RayJob or RayCluster."""
    env = check(args)
    meta = {"name": args.name, **({"namespace": args.namespace} if args.namespace else {})}
    labels = {"app.kubernetes.io/name": "cigma-ray", "app.kubernetes.io/instance": args.name}
    docs, config_map = [], None
    files = {key: Path(path).read_text() for key, path in ((CONFIG_KEY, args.config), (CLASSES_KEY, args.classes))
             if path}
    if files:
        config_map = f"{args.name}-config"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": config_map, "labels": labels},
                     "data": files})
    entrypoint = Folded(shlex.join(entrypoint_argv(args)))
    cluster = ray_cluster_spec(args, config_map)
    if args.kind == "raycluster":
        docs.append({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                     "metadata": {**meta, "labels": labels, "annotations": {ENTRYPOINT_ANNOTATION: entrypoint}},
                     "spec": cluster})
        return docs
    docs.append({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {**meta, "labels": labels}, "spec": {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}, sort_keys=False),  # env only: the image has everything
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 300,  # time to read the logs before the cluster goes
        "activeDeadlineSeconds": args.active_deadline_seconds,
        "backoffLimit": args.backoff_limit,  # each retry resumes from the run directory on a new cluster
        "rayClusterSpec": cluster,
    }})
    return docs


class Folded(str):
    """A long command line, written as a `>-` block folded at spaces (it reads back unchanged)."""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config file, the runtime env) as `|` blocks, commands folded."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
_Dumper.add_representer(Folded, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", str(s), style=">"))


def render_text(args: argparse.Namespace) -> str:
    docs = render(args)
    command = " ".join(shlex.quote(a) for a in render_argv(args))
    if args.kind == "rayjob" and not REMOTE.match(args.out):
        print(f"cigma-ray cluster render: warning: --out {args.out} is a path inside the pods; the run directory "
              "goes with the cluster unless it is on object storage (s3://...) or a mounted volume", file=sys.stderr)
    header = (f"# Rendered by cigma-ray {__version__}; to change it, render again rather than edit:\n"
              f"#   {command}\n")
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)
