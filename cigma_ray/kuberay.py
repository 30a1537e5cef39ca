"""KubeRay manifests (ray.io/v1) for a scan: what `cigma-ray cluster render` writes.

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

import math
import re
import shlex
from dataclasses import dataclass

import yaml

from . import __version__
from .config import ConfigError

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
RAY_POD_OVERHEAD = 2 << 30  # a worker pod's raylet, agents and log monitor beside the replica (assumed)
HEAD_CPUS, HEAD_MEMORY = "4", "16Gi"  # the head runs the scan driver, which loads the model once on CPU


@dataclass(frozen=True)
class ClusterSettings:
    """The cluster's shape and where the job runs (`cluster render`'s cluster options)."""

    image: str
    kind: str = "rayjob"
    name: str = "cigma-scan"
    namespace: str | None = None
    replicas: int = 1
    max_replicas: int | None = None
    gpus_per_replica: int = 1
    gpu_type: str | None = None
    cpus_per_replica: int = 4
    memory: str = "32Gi"
    secret: str = "cigma-ray-s3"
    env: tuple[str, ...] = ()
    active_deadline_seconds: int = 86400
    backoff_limit: int = 2
    ray_version: str = RAY_VERSION

    def to_argv(self) -> list[str]:
        """`cigma-ray cluster render`'s cluster options that give these settings (written at the top of the output)."""
        args = self
        out = ["--kind", args.kind, "--name", args.name]
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
        return out


def check(args: ClusterSettings) -> dict[str, str]:
    """Reject what the KubeRay operator or Kubernetes would reject later; returns the job's env vars."""
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
    return env


def worker_memory(model: str, precision: str | None, gpus_per_replica: int) -> str | None:
    """Memory for a worker pod of an `hf:` model whose config.json can be read here (a local directory or
    config.json): `cigma-ray plan`'s host memory per replica (a GPU replica streams its weights to the GPUs, a
    CPU replica holds them) plus RAY_POD_OVERHEAD for the pod's Ray processes, in whole GiB rounded up. None
    where it cannot be read here (timm models, object-storage URLs): the pods keep --memory."""
    from .engine.memory import default_precision
    from .models import ModelError
    from .models.hf.sizes import read_config
    from .plan import host_memory

    if not model.startswith("hf:"):
        return None
    path = model.removeprefix("hf:")
    if REMOTE.match(path) and not path.startswith("file://"):
        return None
    try:
        config = read_config(path.removeprefix("file://"))
        precision = precision or default_precision(model, "cuda" if gpus_per_replica else "cpu")
        host = host_memory(config, precision, on_gpu=bool(gpus_per_replica))
    except (ModelError, ValueError, KeyError, AttributeError, ImportError):  # not a config plan knows: keep --memory
        return None
    return f"{math.ceil((host + RAY_POD_OVERHEAD) / 2**30)}Gi"


def node_selector(gpu_type: str | None) -> dict[str, str]:
    if not gpu_type:
        return {}
    key, sep, value = gpu_type.partition("=")
    return {key: value} if sep else {"nvidia.com/gpu.product": gpu_type}


# -- the manifests -------------------------------------------------------------------------
def pod_template(args: ClusterSettings, role: str, resources: dict[str, str], config_map: str | None) -> dict:
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


def ray_cluster_spec(args: ClusterSettings, config_map: str | None) -> dict:
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


def render(args: ClusterSettings, entrypoint: list[str], files: dict[str, str]) -> list[dict]:
    """The manifests: the ConfigMap of `files` (the scan's config and classes, if any), then the RayJob or
    RayCluster that runs `entrypoint`."""
    env = check(args)
    meta = {"name": args.name, **({"namespace": args.namespace} if args.namespace else {})}
    labels = {"app.kubernetes.io/name": "cigma-ray", "app.kubernetes.io/instance": args.name}
    docs, config_map = [], None
    if files:
        config_map = f"{args.name}-config"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": config_map, "labels": labels},
                     "data": files})
    entrypoint = Folded(shlex.join(entrypoint))
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


def render_text(args: ClusterSettings, entrypoint: list[str], files: dict[str, str], command: list[str]) -> str:
    """The manifests as YAML, headed by the `command` that renders them again."""
    docs = render(args, entrypoint, files)
    command = " ".join(shlex.quote(a) for a in command)
    header = (f"# Rendered by cigma-ray {__version__}; to change it, render again rather than edit:\n"
              f"#   {command}\n")
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)
