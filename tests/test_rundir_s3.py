"""Runs on object storage: a real S3-protocol server (moto, server mode) on 127.0.0.1.

Everything reaches the server through the standard AWS settings only, as a user would set them
for an S3-compatible store: in-process runs, the CLI in a subprocess, and Ray replicas (which
inherit the driver's environment). Results must equal a run on a local directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

import boto3  # noqa: E402
import s3fs  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from cigma_ray.config import Config  # noqa: E402
from cigma_ray.models import ModelSpec  # noqa: E402
from cigma_ray.pipeline import Job, Pipeline, Worker, run_status  # noqa: E402
from cigma_ray.rundir import (
    RunDir,  # noqa: E402
    RunMismatch,  # noqa: E402
)

from helpers import model_args  # noqa: E402
from s3_server import ACCESS_KEY, SECRET_KEY, aws_env, moto_s3, subprocess_env  # noqa: E402

CFG = Config(tp_ratio=0.8, mask_steps=2, mask_batch=4, unit_images=3, bootstrap=50, top_k=3)
CFG_YAML = "tp_ratio: 0.8\nmask_steps: 2\nmask_batch: 4\nunit_images: 3\nbootstrap: 50\ntop_k: 3\n"
CLI = [sys.executable, "-m", "cigma_ray.cli"]
STATS = ("score", "stderr", "ci_low", "ci_high")


# -- the server and the client settings ------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture(scope="module")
def empty_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("aws") / "empty"
    path.write_text("")
    return str(path)


class S3:
    """The test's view of the store: boto3 for setup and checks, env settings for clients."""

    def __init__(self, endpoint: str, empty_file: str):
        self.endpoint = endpoint
        self.empty_file = empty_file
        self.settings = aws_env(endpoint, empty_file)
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def bucket(self) -> str:
        name = f"cigma-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def bucket_exists(self, name: str) -> bool:
        try:
            self.client.head_bucket(Bucket=name)
            return True
        except ClientError:
            return False

    def objects(self, bucket: str, prefix: str = "") -> dict[str, tuple[str, object]]:
        """key -> (ETag, LastModified) of every object under prefix."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = (o["ETag"], o["LastModified"])
        return out

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def env(self, credentials: bool = True, **extra: str) -> dict[str, str]:
        """A subprocess environment that reaches this server through the standard settings only."""
        settings = aws_env(self.endpoint, self.empty_file, credentials=credentials)
        return subprocess_env(settings, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", **extra)


@pytest.fixture
def s3(endpoint, empty_file, monkeypatch):
    """Point this process's clients at the server; no s3fs instance outlives a test."""
    store = S3(endpoint, empty_file)
    for k, v in store.settings.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield store
    s3fs.S3FileSystem.clear_instance_cache()


# -- runs ----------------------------------------------------------------------------------
def make_job(out: str, folder: str, checkpoint) -> Job:
    path, model, kwargs = checkpoint
    return Job(model=ModelSpec(f"timm:{model}", checkpoint=path, model_kwargs=kwargs), data=folder, out=out, config=CFG)


def local_files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder, tiny_checkpoint):
    """The same run on a local directory: its rankings and its file names."""
    out = str(tmp_path_factory.mktemp("local") / "run")
    Pipeline(make_job(out, image_folder, tiny_checkpoint), progress=False).run_all()
    return {"rankings": pq.read_table(os.path.join(out, "rankings.parquet")), "files": local_files(out), "out": out}


def s3_rankings(url: str) -> pa.Table:
    s3fs.S3FileSystem.clear_instance_cache()  # another process wrote it: no cached listings
    return RunDir(url).read_table("rankings.parquet")


def assert_same_rankings(got: pa.Table, want: pa.Table) -> None:
    assert got.num_rows == want.num_rows
    for col in ("rank", "layer", "head", "n"):
        assert got[col].to_pylist() == want[col].to_pylist(), col
    for col in STATS:
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=0, atol=1e-6, err_msg=col)


def assert_no_temporaries(keys) -> None:
    leftovers = [k for k in keys if k.endswith(".tmp") or ".tmp." in k or k.rsplit("/", 1)[-1].startswith(".")]
    assert not leftovers, leftovers


def assert_no_credentials(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert SECRET_KEY.encode() not in data, "the secret access key was written or printed"
        assert ACCESS_KEY.encode() not in data, "the access key id was written or printed"


def cigma(*args: str, env: dict, cwd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI in its own process group, killed as a group if it overruns."""
    proc = subprocess.Popen(CLI + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"cigma-ray {args[0]} did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def scan_args(checkpoint, folder: str, out: str, config: str, *more: str) -> list[str]:
    path, name, kwargs = checkpoint
    return ["scan", "--model", f"timm:{name}", "--checkpoint", path, "--model-kwargs", *model_args(kwargs),
            "--data", folder, "--out", out, "--config", config, *more]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CFG_YAML)
    return str(path)


# -- tests ---------------------------------------------------------------------------------
def test_in_process_run_on_s3_equals_local_run(s3, reference, image_folder, tiny_checkpoint):
    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/x"
    Pipeline(make_job(url, image_folder, tiny_checkpoint), progress=False).run_all()

    assert_same_rankings(s3_rankings(url), reference["rankings"])
    objects = s3.objects(bucket)
    keys = {k[len("runs/x/"):] for k in objects}
    assert all(k.startswith("runs/x/") for k in objects), sorted(objects)
    assert_no_temporaries(objects)
    # the layout of DESIGN section 3, file for file the same as the local run's
    assert "run.json" in keys and "rankings.parquet" in keys
    for folder in ("predictions", "masks", "deltas", "failures"):
        assert any(k.startswith(f"{folder}/") and k.endswith(".parquet") for k in keys), folder
    assert keys == reference["files"]
    failures = pq.read_table(pa.BufferReader(s3.read(bucket, next(k for k in objects if "/failures/" in k))))
    assert failures["path"].to_pylist() == [os.path.join(image_folder, "a", "zz_broken.png")]
    assert failures["kind"].to_pylist() == ["image"]
    assert_no_credentials(*(s3.read(bucket, k) for k in objects))


def test_interrupted_run_on_s3_resumes_without_rewriting(s3, reference, image_folder, tiny_checkpoint, monkeypatch):
    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/resume"
    job = make_job(url, image_folder, tiny_checkpoint)
    original = Worker.run_unit
    calls = {"scan": 0}

    def interrupted_at_second_scan_unit(self, unit, on_progress=None):
        if unit.stage == "scan":
            calls["scan"] += 1
            if calls["scan"] == 2:
                raise KeyboardInterrupt("simulated interruption")
        return original(self, unit, on_progress)

    monkeypatch.setattr(Worker, "run_unit", interrupted_at_second_scan_unit)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(job, progress=False).run_all()
    monkeypatch.setattr(Worker, "run_unit", original)

    before = s3.objects(bucket)
    deltas = [k for k in before if k.startswith("runs/resume/deltas/")]  # (receipts/deltas/ holds their receipts)
    status = run_status(RunDir(url))
    assert status["stages"]["predict"][0] == status["stages"]["predict"][1]
    assert status["stages"]["scan"][0] == 1 < status["stages"]["scan"][1] and not status["ranked"]
    assert len(deltas) == 1 and not any(k.endswith("rankings.parquet") for k in before)
    assert any("/masks/" in k for k in before) and any("/predictions/" in k for k in before)
    time.sleep(1.1)  # LastModified has one-second resolution: a rewrite now would show

    s3fs.S3FileSystem.clear_instance_cache()  # a new process would start with no cached state either
    done = []
    monkeypatch.setattr(Worker, "run_unit", lambda self, unit, cb=None: done.append(unit.file) or original(self, unit, cb))
    Pipeline(job, progress=False).run_all()
    assert done and all(f.startswith("deltas/") for f in done), done  # predictions and masks were kept
    assert f"deltas/{deltas[0].rsplit('/', 1)[1]}" not in done  # the finished scan unit was kept

    after = s3.objects(bucket)
    assert {k: after[k] for k in before} == before  # no finished object was written again
    assert_no_temporaries(after)
    assert {k[len("runs/resume/"):] for k in after} == reference["files"]
    assert_same_rankings(s3_rankings(url), reference["rankings"])

    done.clear()  # a finished run does nothing but rank again, and refuses other settings
    Pipeline(job, progress=False).run_all()
    assert done == []
    other = Job(model=job.model, data=job.data, out=url, config=CFG.replace(mask_steps=3))
    with pytest.raises(RunMismatch, match="mask_steps"):
        Pipeline(other, progress=False)


def test_cli_scan_show_status_on_s3(s3, reference, image_folder, tiny_checkpoint, config_file, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/cli"
    env = s3.env()
    work = tmp_path / "cwd"
    work.mkdir()

    scan = ok(cigma(*scan_args(tiny_checkpoint, image_folder, url, config_file), env=env, cwd=str(work)))
    assert "top 3 heads" in scan.stdout and "1 image could not be read" in scan.stdout
    assert_same_rankings(s3_rankings(url), reference["rankings"])
    top = reference["rankings"].slice(0, 1).to_pylist()[0]

    show = ok(cigma("show", url, "--top", "2", env=env, cwd=str(work)))
    assert "top 2 heads" in show.stdout and "95% CI" in show.stdout and url in show.stdout
    first_row = next(line for line in show.stdout.splitlines() if line.split()[:1] == ["1"])
    assert first_row.split()[1:4] == [str(top["layer"]), str(top["head"]), f"{top['score']:+.5f}"]

    status = ok(cigma("status", url, env=env, cwd=str(work)))
    lines = status.stdout.splitlines()
    for stage in ("predict", "mask", "scan"):
        line = next(x for x in lines if x.startswith(stage + " "))
        done, total = line.split()[1].split("/")
        assert done == total and "missing" not in line, line
    assert "ranked   yes" in status.stdout and "1 image could not be read" in status.stdout

    assert list(work.iterdir()) == []  # nothing was written locally
    objects = s3.objects(bucket)
    assert_no_temporaries(objects)
    assert {k[len("runs/cli/"):] for k in objects} == reference["files"]
    assert_no_credentials(*(s3.read(bucket, k) for k in objects),
                          *(p.stdout + p.stderr for p in (scan, show, status)))


def ray_processes(marker: str) -> list[int]:
    """pids of live processes whose command line names `marker` (this test's Ray temp dir)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_ray_run_writes_to_s3(s3, reference, image_folder, tiny_checkpoint, config_file, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/ray"
    ray_tmp = tempfile.mkdtemp(prefix="cigma-s3-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = s3.env(RAY_TMPDIR=ray_tmp)
    try:
        scan = cigma(*scan_args(tiny_checkpoint, image_folder, url, config_file, "--address", "local",
                                "--replicas", "2", "--quiet"), env=env, cwd=str(tmp_path))
        ok(scan)
        assert "top 3 heads" in scan.stdout
        assert_same_rankings(s3_rankings(url), reference["rankings"])
        objects = s3.objects(bucket)
        assert_no_temporaries(objects)
        assert {k[len("runs/ray/"):] for k in objects} == reference["files"]
        assert_no_credentials(scan.stdout, scan.stderr, *(s3.read(bucket, k) for k in objects))
        # Ray was shut down with the command: none of its processes outlive it
        deadline = time.monotonic() + 30
        while ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray_processes(ray_tmp) == []
        # the run did use Ray (its session lives in RAY_TMPDIR), and Ray's own logs hold no credentials
        logs = [os.path.join(d, f) for d, _, fs in os.walk(ray_tmp) for f in fs]
        assert any("session_" in f for f in logs), logs
        for path in logs:
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    assert_no_credentials(f.read())
    finally:
        kill_ray(ray_tmp)


def kill_ray(ray_tmp: str) -> None:
    """Stop what is left of the Ray this test started (found by its temp dir), then remove the dir."""
    for pid in ray_processes(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("address", [None, "local"])
def test_missing_bucket_is_a_clear_early_error(s3, image_folder, tiny_checkpoint, config_file, tmp_path, address):
    missing = f"cigma-missing-{uuid.uuid4().hex[:8]}"
    ray_tmp = tempfile.mkdtemp(prefix="cigma-s3-ray-", dir="/tmp")
    work = tmp_path / "cwd"
    work.mkdir()
    buckets = {b["Name"] for b in s3.client.list_buckets()["Buckets"]}
    more = ["--address", address, "--replicas", "2"] if address else []
    try:
        proc = cigma(*scan_args(tiny_checkpoint, image_folder, f"s3://{missing}/runs/x", config_file, *more),
                     env=s3.env(RAY_TMPDIR=ray_tmp), cwd=str(work))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert repr(missing) in proc.stderr or missing in proc.stderr
        assert "does not exist" in proc.stderr and "create it" in proc.stderr, proc.stderr
        assert_no_credentials(proc.stdout, proc.stderr)
        # nothing written anywhere, and no cluster was started
        assert not s3.bucket_exists(missing)
        assert {b["Name"] for b in s3.client.list_buckets()["Buckets"]} == buckets
        assert list(work.iterdir()) == []
        assert os.listdir(ray_tmp) == []
    finally:
        kill_ray(ray_tmp)


def test_missing_credentials_is_a_clear_early_error(s3, image_folder, tiny_checkpoint, config_file, tmp_path):
    bucket = s3.bucket()
    work = tmp_path / "cwd"
    work.mkdir()
    env = s3.env(credentials=False)
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    start = time.monotonic()
    proc = cigma(*scan_args(tiny_checkpoint, image_folder, f"s3://{bucket}/runs/x", config_file), env=env,
                 cwd=str(work), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "credentials" in proc.stderr.lower() and bucket in proc.stderr, proc.stderr
    assert time.monotonic() - start < 120  # no instance-role lookup or retry loop
    assert s3.objects(bucket) == {}
    assert list(work.iterdir()) == []


def test_unreachable_endpoint_is_a_clear_early_error(s3, image_folder, tiny_checkpoint, config_file, tmp_path):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = tmp_path / "cwd"
    work.mkdir()
    env = s3.env()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    proc = cigma(*scan_args(tiny_checkpoint, image_folder, "s3://some-bucket/runs/x", config_file), env=env,
                 cwd=str(work), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "s3://some-bucket/runs/x" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr, proc.stderr
    assert_no_credentials(proc.stdout, proc.stderr)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("command", ["show", "status"])
def test_show_and_status_without_credentials_are_clear_errors(s3, command, tmp_path):
    """DESIGN 7: no credentials is a clear error; `show`/`status` read the run, so they must say so too."""
    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/x"
    s3.client.put_object(Bucket=bucket, Key="runs/x/run.json", Body=b"{}")
    proc = cigma(command, url, env=s3.env(credentials=False), cwd=str(tmp_path), timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "credentials" in proc.stderr.lower() and url in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["show", "status"])
def test_show_and_status_on_a_missing_bucket(s3, command, tmp_path):
    missing = f"cigma-missing-{uuid.uuid4().hex[:8]}"
    proc = cigma(command, f"s3://{missing}/runs/x", env=s3.env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert missing in proc.stderr
    assert_no_credentials(proc.stdout, proc.stderr)
    assert not s3.bucket_exists(missing)


def test_sigkill_during_an_s3_upload_of_a_unit_file_resumes_to_the_same_rankings(s3, reference, image_folder,
                                                                                 tiny_checkpoint, config_file, tmp_path):
    """The scan command killed (SIGKILL) while the PUT of a deltas unit file is half sent (a proxy on loopback holds
    it there): the store holds no part of that object, and the same command finishes the run to the rankings of an
    uninterrupted run, file for file."""
    from s3_server import HoldingProxy

    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/kill"
    proxy = HoldingProxy(s3.endpoint)
    proxy.arm(b"/deltas/")
    work = tmp_path / "cwd"
    work.mkdir()
    env = s3.env()
    env["AWS_ENDPOINT_URL"] = proxy.url
    proc = subprocess.Popen(CLI + scan_args(tiny_checkpoint, image_folder, url, config_file, "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(work),
                            start_new_session=True)
    try:
        held = proxy.held.wait(timeout=600)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert held, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proxy.close()
    key = proxy.held_request.split(b" ")[1].decode().split("?")[0].lstrip("/").split("/", 1)[1]
    assert key.startswith("runs/kill/deltas/") and key.endswith(".parquet"), key
    time.sleep(0.5)  # the server notices the dropped connection
    objects = s3.objects(bucket)
    assert key not in objects and key.replace("runs/kill/", "runs/kill/receipts/") + ".json" not in objects
    assert any("/masks/" in k for k in objects) and not any(k.endswith("rankings.parquet") for k in objects)
    assert_no_temporaries(objects)

    ok(cigma(*scan_args(tiny_checkpoint, image_folder, url, config_file, "--quiet"), env=s3.env(), cwd=str(work)))
    assert_same_rankings(s3_rankings(url), reference["rankings"])
    objects = s3.objects(bucket)
    assert {k[len("runs/kill/"):] for k in objects} == reference["files"]
    assert_no_temporaries(objects)
    assert list(work.iterdir()) == []


def test_adaptive_scan_on_s3_equals_the_local_one(s3, image_folder, tiny_checkpoint, tmp_path):
    """`scan --adaptive --order screen` on object storage: its rounds' units, the pre-screen and adaptive.json
    land under the run's prefix file for file as on a local disk, with the same ranking."""
    cfg = CFG.replace(adaptive=True, delta=0.5, adaptive_first=3, adaptive_growth=1.5, adaptive_order="screen")
    path, model, kwargs = tiny_checkpoint
    spec = ModelSpec(f"timm:{model}", checkpoint=path, model_kwargs=kwargs)
    local = str(tmp_path / "local")
    Pipeline(Job(model=spec, data=image_folder, out=local, config=cfg), progress=False).run_all()
    bucket = s3.bucket()
    url = f"s3://{bucket}/runs/adaptive"
    Pipeline(Job(model=spec, data=image_folder, out=url, config=cfg), progress=False).run_all()
    got, want = s3_rankings(url), pq.read_table(os.path.join(local, "rankings.parquet"))
    for col in ("rank", "layer", "head", "n", "in_top_k", "decided_early", "decided_round"):
        assert got[col].to_pylist() == want[col].to_pylist(), col
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-6)
    objects = s3.objects(bucket, "runs/adaptive/")
    keys = {k[len("runs/adaptive/"):] for k in objects}
    assert keys == local_files(local)
    assert any(k.startswith("deltas/adaptive/round-000/") for k in keys) and any(k.startswith("screen/") for k in keys)
    assert_no_temporaries(objects)
    s3fs.S3FileSystem.clear_instance_cache()
    assert RunDir(url).read_json("adaptive.json") == json.loads(open(os.path.join(local, "adaptive.json")).read())
