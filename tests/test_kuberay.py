"""KubeRay: the shipped and rendered manifests, checked the way the operator and the pods will.

No Kubernetes here, so each thing the cluster would do is checked offline instead: the KubeRay
v1 CRD schemas and the operator's admission rules (what `kubectl apply` would reject), the
entrypoint through the project's own CLI in dry-run mode (what the head pod would run), and a
rehearsal of the operator's work on 127.0.0.1 (`ray start` for a head and a worker, the job
submitted through Ray's job submission API as the RayJob's submitter does).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cigma_ray import kuberay as cluster
from cigma_ray.cli import main

from helpers import write_folder

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
SCHEMAS = Path(os.environ.get("CIGMA_KUBERAY_SCHEMAS") or ROOT.parent / "shared" / "kuberay")
RAY_KINDS = ("RayJob", "RayCluster")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|KEY_ID", re.I)
CREDENTIAL_TEXT = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S", re.I)

SCAN = ["--model", "timm:vit_base_patch16_224", "--data", "s3://my-bucket/images", "--out", "s3://my-bucket/runs/x"]
IMAGE = ["--image", "registry.example.com/cigma-ray:0.1.0"]
RENDER_CASES = {
    "gpu-job": [*IMAGE, "--replicas", "2", "--gpu-type", "NVIDIA-H100-80GB-HBM3", "--precision", "bf16", *SCAN],
    "autoscaling-job": [*IMAGE, "--replicas", "1", "--max-replicas", "8", "--gpus-per-replica", "2", *SCAN],
    "cpu-job-no-secret": [*IMAGE, "--gpus-per-replica", "0", "--cpus-per-replica", "8", "--secret", "", *SCAN],
    "no-config": [*IMAGE, "--name", "a" * 47, "--namespace", "vision", "--env", "AWS_ENDPOINT_URL=http://minio:9000",
                  "--gpu-type", "cloud.google.com/gke-accelerator=nvidia-l4", *SCAN],
    "raycluster": ["--kind", "raycluster", "--name", "b" * 53, *IMAGE, "--max-replicas", "4", "--gpu-type",
                   "NVIDIA-A100-SXM4-80GB", "--checkpoint", "/weights/vit.pth", "--num-classes", "10",
                   "--model-kwargs", "img_size=384", "global_pool=avg", *SCAN],
}
CONFIG_TEXT = "# a comment survives\ntp_ratio: 0.5\nmask_steps: 100\ntop_k: 8\n"


# -- loading and rendering -----------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def shipped_files() -> list[Path]:
    files = sorted(KUBERAY.glob("*.yaml"))
    assert files, f"no manifests in {KUBERAY}"
    return files


def render(tmp_path: Path, args: list[str], config: str | None = CONFIG_TEXT) -> Path:
    """`cigma-ray cluster render ... --output FILE` through the CLI; returns the file."""
    if config is not None:
        (tmp_path / "scan.yaml").write_text(config)
        args = [*args, "--config", str(tmp_path / "scan.yaml")]
    out = tmp_path / "rendered.yaml"
    assert main(["cluster", "render", *args, "--output", str(out)]) == 0
    return out


SHIPPED = sorted(p.name for p in KUBERAY.glob("*.yaml"))
MANIFESTS = [f"shipped:{name}" for name in SHIPPED] + [f"rendered:{case}" for case in sorted(RENDER_CASES)]


@pytest.fixture(params=MANIFESTS)
def manifest_file(request, tmp_path) -> Path:
    """A shipped manifest file, or one rendered with one of RENDER_CASES."""
    source, name = request.param.split(":", 1)
    if source == "shipped":
        return KUBERAY / name
    return render(tmp_path, RENDER_CASES[name], None if name == "no-config" else CONFIG_TEXT)


def ray_docs(path: Path) -> list[dict]:
    return [d for d in load_docs(path) if d.get("kind") in RAY_KINDS]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def entrypoint(doc: dict) -> str:
    if doc["kind"] == "RayJob":
        return doc["spec"]["entrypoint"]
    return doc["metadata"]["annotations"][cluster.ENTRYPOINT_ANNOTATION]


def containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# -- schema and admission ------------------------------------------------------------------
@pytest.fixture(scope="module")
def validators():
    files = {"RayJob": SCHEMAS / "rayjob_v1.json", "RayCluster": SCHEMAS / "raycluster_v1.json"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"KubeRay v1 schemas not found ({', '.join(missing)}): put them in ../shared/kuberay or point "
                    "CIGMA_KUBERAY_SCHEMAS at their folder; the manifests were NOT validated")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate manifests")
    return {kind: jsonschema.Draft7Validator(json.loads(p.read_text())) for kind, p in files.items()}


def admission_errors(doc: dict) -> list[str]:
    """The operator's checks that the schema cannot express (the schemas folder's README)."""
    errors, kind, spec = [], doc["kind"], doc.get("spec", {})
    name = doc.get("metadata", {}).get("name", "")
    limit = 47 if kind == "RayJob" else 53
    if len(name) > limit:
        errors.append(f"name {name!r} is longer than {limit} characters")
    if not DNS_1035.fullmatch(name):
        errors.append(f"name {name!r} is not DNS-1035")
    ray_cluster = spec
    if kind == "RayJob":
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("suspend needs shutdownAfterJobFinishes")
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            errors.append("exactly one of rayClusterSpec and clusterSelector")
        if spec.get("clusterSelector") and spec.get("backoffLimit", 0) > 0:
            errors.append("backoffLimit with clusterSelector")
        ray_cluster = spec.get("rayClusterSpec") or {}
    workers = ray_cluster.get("workerGroupSpecs") or []
    for group in [ray_cluster.get("headGroupSpec") or {}, *workers]:
        for key, value in (group.get("rayStartParams") or {}).items():
            if not isinstance(value, str):
                errors.append(f"rayStartParams {key}={value!r} is not a string")
    for group in workers:
        if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
            errors.append(f"worker group {group.get('groupName')}: minReplicas > maxReplicas")
    return errors


def problems(doc: dict, validators) -> list[str]:
    schema = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]
    return schema + admission_errors(doc)


def test_manifests_pass_schema_and_admission(manifest_file, validators):
    docs = ray_docs(manifest_file)
    assert docs, f"{manifest_file} has no RayJob or RayCluster"
    for doc in docs:
        assert problems(doc, validators) == [], f"{manifest_file.name}: {doc['kind']} {doc['metadata']['name']}"


def test_shipped_set_is_complete():
    kinds = {p.name: [d["kind"] for d in ray_docs(p)] for p in shipped_files()}
    assert kinds.get("rayjob.yaml") == ["RayJob"] and kinds.get("raycluster.yaml") == ["RayCluster"], kinds
    job = ray_docs(KUBERAY / "rayjob.yaml")[0]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] > 0
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
    head = job["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    worker = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["nodeSelector"] and worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    scaling = ray_docs(KUBERAY / "rayjob-autoscaling.yaml")[0]["spec"]["rayClusterSpec"]
    group = scaling["workerGroupSpecs"][0]
    assert scaling["enableInTreeAutoscaling"] is True and group["minReplicas"] < group["maxReplicas"]


def test_raycluster_dashboard_is_not_exposed():
    """Only `kubectl port-forward` reaches it: a ClusterIP head service, no ingress."""
    for path in shipped_files():
        for doc in load_docs(path):
            assert doc.get("kind") not in ("Service", "Ingress"), path.name
            if doc.get("kind") in RAY_KINDS:
                head = cluster_spec(doc)["headGroupSpec"]
                assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")


@pytest.mark.parametrize("path", ["rayjob.yaml", "rayjob-autoscaling.yaml", "raycluster.yaml"])
def test_shipped_manifests_are_what_render_makes(path, tmp_path):
    """Each shipped file starts with the render command that made it; running it gives the same manifests."""
    text = (KUBERAY / path).read_text()
    command = re.search(r"^#\s+(cigma-ray cluster render .*)$", text, re.M)
    assert command, f"{path}: no render command in its header"
    argv = shlex.split(command.group(1))[1:]
    config_map = next(d for d in load_docs(KUBERAY / path) if d["kind"] == "ConfigMap")
    config = tmp_path / "scan.yaml"
    config.write_text(config_map["data"][cluster.CONFIG_KEY])
    argv[argv.index("--config") + 1] = str(config)
    assert main([*argv, "--output", str(tmp_path / "out.yaml")]) == 0
    assert load_docs(tmp_path / "out.yaml") == load_docs(KUBERAY / path)


def valid_job(tmp_path: Path) -> dict:
    return ray_docs(render(tmp_path, RENDER_CASES["autoscaling-job"]))[0]


def set_path(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[last] = value


@pytest.mark.parametrize("path,value", [
    ("spec.shutdownAfterJobFinish", True),  # misspelt field
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.nodeSelecter", {"a": "b"}),  # misspelt, deep down
    ("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", 0),  # an int where Ray wants a string
    ("metadata.name", "c" * 60),  # longer than the operator admits
    ("metadata.name", "Cigma_Scan"),  # not DNS-1035
    ("spec.suspend", True),  # with shutdownAfterJobFinishes off (below)
    ("spec.clusterSelector", {"ray.io/cluster": "x"}),  # and rayClusterSpec
    ("spec.rayClusterSpec.workerGroupSpecs.0.minReplicas", 9),  # above maxReplicas 8
    ("spec.backoffLimit", "2"),  # wrong type
])
def test_broken_manifest_fails(path, value, tmp_path, validators):
    doc = valid_job(tmp_path)
    assert problems(doc, validators) == []
    set_path(doc, path, value)
    if path == "spec.suspend":
        doc["spec"]["shutdownAfterJobFinishes"] = False
    assert problems(doc, validators), f"{path}={value!r} was not caught"


def test_cluster_selector_with_backoff_limit_fails(tmp_path, validators):
    doc = valid_job(tmp_path)
    del doc["spec"]["rayClusterSpec"]
    doc["spec"]["clusterSelector"] = {"ray.io/cluster": "interactive"}
    assert problems(doc, validators) == ["backoffLimit with clusterSelector"]
    doc["spec"]["backoffLimit"] = 0
    assert problems(doc, validators) == []


@pytest.mark.parametrize("extra,message", [
    (["--name", "d" * 48], "at most 47"),
    (["--name", "Scan"], "lower-case"),
    (["--env", "AWS_SECRET_ACCESS_KEY=abc"], "credentials never go into a manifest"),
    (["--replicas", "3", "--max-replicas", "2"], "--max-replicas 2"),
    (["--gpus-per-replica", "0", "--gpu-type", "NVIDIA-L4"], "--gpu-type"),
    (["--memory", "lots"], "--memory"),
])
def test_render_rejects_bad_arguments(extra, message, tmp_path, capsys):
    out = tmp_path / "x.yaml"
    assert main(["cluster", "render", *IMAGE, *SCAN, *extra, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_render_rejects_what_the_scan_would(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("mask_stepz: 3\n")
    assert main(["cluster", "render", *IMAGE, *SCAN, "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "mask_stepz" in capsys.readouterr().err
    assert main(["cluster", "render", *IMAGE, *SCAN[2:], "--model", "timm:no_such_vit"]) == 2
    assert "no_such_vit" in capsys.readouterr().err


# -- the entrypoint and the credentials ----------------------------------------------------
def local_entrypoint(path: Path, doc: dict, workdir: Path) -> list[str]:
    """The entrypoint's argv, with the config path pointing at a local copy of its ConfigMap."""
    argv = shlex.split(entrypoint(doc))
    assert argv[:2] == ["cigma-ray", "scan"], argv
    if "--config" in argv:
        i = argv.index("--config") + 1
        mount = containers(doc)[0]["volumeMounts"]
        config_dir = next(m["mountPath"] for m in mount if argv[i].startswith(m["mountPath"] + "/"))
        volumes = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["volumes"]
        volume = next(v for v in volumes if v.get("configMap"))["configMap"]["name"]
        config_map = next(d for d in load_docs(path) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume)
        local = workdir / Path(argv[i]).relative_to(config_dir)
        local.write_text(config_map["data"][Path(argv[i]).name])
        argv[i] = str(local)
    return argv


def test_entrypoint_passes_the_cli_dry_run(manifest_file, tmp_path, capsys):
    for doc in ray_docs(manifest_file):
        argv = local_entrypoint(manifest_file, doc, tmp_path)
        assert argv[argv.index("--address") + 1] == "auto"
        assert main([*argv[1:], "--dry-run"]) == 0, capsys.readouterr().err
        assert "ok: would scan" in capsys.readouterr().out
        # the scan asks for what the pods hold: one replica per worker pod, its GPUs and CPUs
        group = cluster_spec(doc)["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert argv[argv.index("--replicas") + 1] == str(group["maxReplicas"])
        assert argv[argv.index("--gpus-per-replica") + 1] == limits.get("nvidia.com/gpu", "0")
        assert argv[argv.index("--cpus-per-replica") + 1] == limits["cpu"]


def test_no_literal_credentials(manifest_file):
    text = manifest_file.read_text()
    assert not CREDENTIAL_TEXT.search(text), manifest_file.name
    for doc in load_docs(manifest_file):
        assert doc.get("kind") != "Secret", f"{manifest_file.name}: ship no Secret; reference one"
        if doc.get("kind") not in RAY_KINDS:
            continue
        for container in containers(doc):
            for env in container.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env
            for source in container.get("envFrom", []):
                assert set(source) <= {"secretRef", "configMapRef", "prefix"}, source
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
            assert set(runtime_env) <= {"env_vars"}, "the image has everything: no pip, no working_dir"
            assert not [k for k in runtime_env.get("env_vars", {}) if CREDENTIAL_NAME.search(k)]


def test_shipped_manifests_take_credentials_from_a_secret():
    for path in shipped_files():
        for doc in ray_docs(path):
            for container in containers(doc):
                assert container["envFrom"] == [{"secretRef": {"name": "cigma-ray-s3"}}], path.name


def test_dockerfile_matches_the_manifests():
    """The manifests' rayVersion and non-root user id are the image's."""
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={cluster.RAY_VERSION}" in text
    assert f"USER {cluster.USER_ID}" in text
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda\S+-runtime$", text, re.M)


# -- a rehearsal of what the operator does ---------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of a session: `ray start` and all it spawned, including the workers that raylet
    puts in process groups of their own (so killing the group alone would miss them)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is dead, only not yet reaped
            pids.append(int(stat.parent.name))
    return pids


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM the node's process group (`ray start --block` then stops what it started), then
    SIGKILL whatever is left of its session."""
    def signal_all(sig: int) -> None:
        for pid in {proc.pid, *session_pids(proc.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for sig in (None, signal.SIGKILL):
        if sig:
            signal_all(sig)
        deadline = time.monotonic() + 15
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    proc.wait(timeout=30)


def ray_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """One `ray start --block` node in its own session; every port chosen here, so that other Ray
    clusters on this machine (other people's tests) are neither disturbed nor joined."""
    ray = Path(sys.executable).with_name("ray")
    ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    cmd = [str(ray), "start", *args, "--block", "--disable-usage-stats"]
    for flag in ports:
        cmd += [flag, str(free_port())]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what} within {timeout} s\n" + "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs))


@pytest.mark.timeout(900)
def test_local_rehearsal_of_a_rayjob(tmp_path, monkeypatch):
    """Head with num-cpus 0 and one worker, as KubeRay starts them; the rendered RayJob's entrypoint
    and runtime env submitted as its submitter does; the run's results checked; everything stopped."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes

    data = write_folder(tmp_path / "data")
    out = tmp_path / "run"
    (tmp_path / "scan.yaml").write_text("mask_steps: 2\nunit_images: 4\nbootstrap: 50\ntop_k: 3\ntp_ratio: 1.0\n")
    manifest = tmp_path / "job.yaml"
    assert main(["cluster", "render", "--name", "rehearsal", "--image", "local/cigma-ray:test", "--replicas", "1",
                 "--gpus-per-replica", "0", "--cpus-per-replica", "2", "--secret", "",
                 "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--num-classes", "3",
                 "--model-kwargs", "img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3",
                 "--data", data, "--out", str(out), "--config", str(tmp_path / "scan.yaml"), "--quiet",
                 "--output", str(manifest)]) == 0
    job = ray_docs(manifest)[0]
    config_dir = tmp_path / "config"  # stands in for the ConfigMap mount
    config_dir.mkdir()
    argv = local_entrypoint(manifest, job, config_dir)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # cigma-ray, as in the image
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="cigma-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = free_port(), free_port()
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    nodes = []
    try:
        nodes.append(ray_node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host",
                               "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "0", "--temp-dir", temp_dir,
                               "--ray-client-server-port", str(free_port())], env, logs[0]))
        url = f"http://127.0.0.1:{dashboard}"
        client = wait_for("the dashboard did not answer", lambda: JobSubmissionClient(url), 180, logs)
        nodes.append(ray_node(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                               "--temp-dir", temp_dir], env, logs[1]))
        # KubeRay submits once every pod is ready: here, once the worker's 2 CPUs are in the cluster
        wait_for("the worker did not join", lambda: any(
            n.resources_total.get("CPU") == 2 for n in list_nodes(url, filters=[("state", "=", "ALIVE")])), 180, logs)

        job_id = client.submit_job(entrypoint=shlex.join(argv), runtime_env=runtime_env)
        deadline = time.monotonic() + 700
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.monotonic() > deadline:
                break
            time.sleep(2)
        if status != JobStatus.SUCCEEDED:
            pytest.fail(f"job {status}:\n{client.get_job_logs(job_id)[-6000:]}")

        rankings = pq.read_table(out / "rankings.parquet")
        assert rankings.num_rows == 2 * 3  # one row per head: depth 2 x 3 heads
        assert sorted(zip(rankings["layer"].to_pylist(), rankings["head"].to_pylist())) == [
            (layer, head) for layer in range(2) for head in range(3)]
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
    for node in nodes:
        assert not session_pids(node.pid), "a Ray process outlived the test"


def test_render_carries_a_vlms_options_and_classes_file(tmp_path, validators):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    path = render(tmp_path, [*IMAGE, "--gpus-per-replica", "4", "--model", "hf:s3://my-bucket/models/llava-13b",
                             "--classes", str(classes), "--prompt", "Which is it: {classes}?", "--heads", "vision+text",
                             "--data", "s3://my-bucket/images", "--out", "s3://my-bucket/runs/vlm"])
    docs = load_docs(path)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["data"]["classes.txt"] == "cat\ndog\n" and "scan.yaml" in config_map["data"]
    job = ray_docs(path)[0]
    assert problems(job, validators) == []
    argv = shlex.split(entrypoint(job))
    assert argv[argv.index("--classes") + 1] == "/config/classes.txt"
    assert argv[argv.index("--prompt") + 1] == "Which is it: {classes}?"
    assert argv[argv.index("--heads") + 1] == "vision+text"
    assert argv[argv.index("--gpus-per-replica") + 1] == "4"
    assert main(["cluster", "render", *IMAGE, "--model", "hf:/models/x", "--classes", str(tmp_path / "missing.txt"),
                 "--data", "d", "--out", "o"]) == 2


def test_render_sizes_worker_pods_from_the_plan(tmp_path, validators, capsys):
    """An hf: model whose config.json is readable here: worker pods get `plan`'s host memory per replica (weights
    streamed to the GPUs; held on the host by a CPU replica) plus the pod's Ray processes. Elsewhere (object
    storage, timm) or with --memory given, the pods keep --memory."""
    import math

    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from hf_configs import internvl2_26b

    from cigma_ray.models.hf.sizes import read_config
    from cigma_ray.plan import host_memory

    model = internvl2_26b(str(tmp_path / "InternVL2-26B"))
    where = ["--data", "s3://my-bucket/images", "--out", "s3://my-bucket/runs/ivl"]

    def worker_memory_of(path: Path) -> str:
        job = ray_docs(path)[0]
        assert problems(job, validators) == []
        group = cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
        assert group["limits"]["memory"] == group["requests"]["memory"]
        return group["limits"]["memory"]

    config = read_config(model)
    for gpus, precision in (("1", "bf16"), ("0", "fp32")):  # bf16 by default on GPUs, fp32 on CPUs
        path = render(tmp_path, [*IMAGE, "--gpus-per-replica", gpus, "--model", f"hf:{model}", *where])
        want = math.ceil((host_memory(config, precision, on_gpu=gpus == "1") + cluster.RAY_POD_OVERHEAD) / 2**30)
        assert worker_memory_of(path) == f"{want}Gi"
        assert f"--memory {want}Gi" in path.read_text().splitlines()[1]  # the header renders it again
        assert f"worker pods get {want}Gi" in capsys.readouterr().err
        assert (want < 10) if gpus == "1" else (want > 100)  # 26 B parameters: streamed to the GPU, or held in fp32
    given = render(tmp_path, [*IMAGE, "--memory", "48Gi", "--model", f"hf:{model}", *where])
    assert worker_memory_of(given) == "48Gi"
    remote = render(tmp_path, [*IMAGE, "--model", "hf:s3://my-bucket/models/InternVL2-26B", *where])
    assert worker_memory_of(remote) == "32Gi"
