"""The pipeline on real Ray clusters: replicas, a killed worker, a poison unit, a killed driver, a lost node.

Every test starts real Ray processes (an in-process `ray.init`, the CLI with `--address local`, or
`ray start` nodes) and checks, even when it fails, that none of them is left behind (see
ray_cluster.py). Results are compared with the single-process run of the same job.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

os.environ["RAY_AUTH_MODE"] = "disabled"  # every Ray process of this module, in-process ones included

from cigma_ray.config import Config  # noqa: E402
from cigma_ray.data import open_source  # noqa: E402
from cigma_ray.distributed import RayExecutor, ray_executor  # noqa: E402
from cigma_ray.models import ModelSpec  # noqa: E402
from cigma_ray.pipeline import Job, LocalExecutor, Pipeline  # noqa: E402
from cigma_ray.rundir import RunDir  # noqa: E402

from helpers import labelled_folder, model_args, perturb  # noqa: E402
from ray_cluster import ProcessTracker, RayNodes, free_port, ray_env, wait_for  # noqa: E402

CLI = [sys.executable, "-m", "cigma_ray.cli"]

# Fast: the tiny checkpoint; 8 images in D, 16 predict, 4 mask and 12 scan units.
FAST = Config(tp_ratio=1.0, mask_steps=5, mask_batch=2, unit_images=2, unit_layers=1, bootstrap=50, top_k=3, batch_size=8)
# Slow enough to kill things mid-stage: a wider ViT at 64 px (4 layers x 4 heads), 24 images, all in D;
# 12 mask units of ~0.2 s and 48 scan units of ~0.05 s each on an idle CPU.
SLOW = Config(tp_ratio=1.0, mask_steps=10, mask_batch=2, unit_images=2, unit_layers=1, bootstrap=50, top_k=3, batch_size=8)
SLOW_MODEL = ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=4))


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def ray_tmpdir():
    """A Ray temp dir of each test's own (short: it holds unix sockets), inherited by every Ray process it starts:
    no cluster here writes /tmp/ray/ray_current_cluster, which other people's `ray.init()` and `--address auto`
    would connect to, and no test finds another's cluster."""
    path = tempfile.mkdtemp(prefix="cgr", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(path, ignore_errors=True)


_TRACKERS: list[ProcessTracker] = []


@pytest.fixture
def procs():
    """Tracks every process the test starts; fails the test if one outlives it (after killing it)."""
    tracker = ProcessTracker()
    tracker.tolerated = ()  # command-line fragments of processes allowed to outlive the test (then killed)
    _TRACKERS.append(tracker)
    try:
        yield tracker
    finally:
        _TRACKERS.remove(tracker)
        if ray.is_initialized():
            ray.shutdown()
        left = tracker.close(grace=30, tolerated=tracker.tolerated)
        leaked = {k: c for k, c in left.items() if not any(t in c for t in tracker.tolerated)}
        if leaked:
            pytest.fail(f"processes left behind (now killed): {sorted(leaked.items())}", pytrace=False)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, image_folder, tiny_checkpoint):
    """The tiny checkpoint on the shared image folder, run in this process: the reference for FAST."""
    path, name, kwargs = tiny_checkpoint
    spec = ModelSpec(f"timm:{name}", checkpoint=path, model_kwargs=kwargs)
    root = tmp_path_factory.mktemp("fast")
    return Reference(spec, image_folder, str(root / "reference"), FAST)


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """A wider checkpoint and 24 images it classifies correctly (class folders named by its predictions)."""
    root = tmp_path_factory.mktemp("slow")
    name, kwargs = SLOW_MODEL
    torch.manual_seed(0)
    model = perturb(timm_model(name, kwargs), scale=0.2)
    ckpt = str(root / "wide.pth")
    torch.save(model.state_dict(), ckpt)
    spec = ModelSpec(f"timm:{name}", checkpoint=ckpt, model_kwargs=kwargs)
    folder = labelled_folder(root / "data", spec, n=24, size=64)
    return Reference(spec, folder, str(root / "reference"), SLOW)


def timm_model(name, kwargs):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)




class Reference:
    """A job run start to end in this process, without Ray; what every distributed run must reproduce."""

    def __init__(self, spec: ModelSpec, data: str, out: str, cfg: Config):
        self.spec, self.data, self.out, self.cfg = spec, data, out, cfg
        pipeline = Pipeline(self.job(out), progress=False)
        pipeline.run_all()
        self.selected = pipeline.selected()
        self.heads = pipeline.adapter.heads
        self.predict_units = pipeline.predict_units()
        self.mask_units = pipeline.mask_units(self.selected)
        self.scan_units = pipeline.scan_units(self.selected)
        self.rankings = pq.read_table(os.path.join(out, "rankings.parquet"))
        scores = np.sort(self.rankings["score"].to_numpy())
        # rank order is only comparable across runs when no two heads score within float noise of each other
        assert np.diff(scores).min() > 1e-6, "test data gives near-tied head scores; pick another seed"
        assert len(self.mask_units) >= 4 and len(self.scan_units) >= 12

    def job(self, out: str) -> Job:
        return Job(model=self.spec, data=self.data, out=out, config=self.cfg)

    def cli_args(self, out: str, config_path: str, *extra: str) -> list[str]:
        write_config(config_path, self.cfg)
        return ["scan", "--model", self.spec.name, "--checkpoint", self.spec.checkpoint,
                "--model-kwargs", *model_args(self.spec.model_kwargs), "--data", self.data, "--out", out,
                "--config", config_path, *extra]


def write_config(path: str, cfg: Config) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)


# -- checks ------------------------------------------------------------------------------------
def assert_same_rankings(out: str, ref: Reference) -> None:
    got = pq.read_table(os.path.join(out, "rankings.parquet"))
    want = ref.rankings
    assert got.num_rows == want.num_rows == len(ref.heads)
    assert got.select(["rank", "layer", "head", "n"]).equals(want.select(["rank", "layer", "head", "n"])), \
        f"rank order differs:\n{got.select(['layer', 'head']).to_pylist()}\n{want.select(['layer', 'head']).to_pylist()}"
    for column in ("score", "stderr", "ci_low", "ci_high"):
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=0, atol=1e-6, err_msg=column)


def assert_deltas_exact(out: str, ref: Reference) -> None:
    """Every (image, layer, head) exactly once: heads x images rows, no duplicates, no gaps."""
    deltas = RunDir(out).read_folder("deltas", ["image_id", "layer", "head"])
    keys = list(zip(*(deltas[c].to_pylist() for c in ("image_id", "layer", "head"))))
    assert len(keys) == len(ref.heads) * len(ref.selected)
    assert set(keys) == {(i, l, h) for i in ref.selected for l, h in ref.heads}


def unit_files(out: str, folder: str) -> list[str]:
    path = os.path.join(out, folder)
    return sorted(n for n in os.listdir(path) if n.endswith(".parquet") and not n.startswith(".")) if os.path.isdir(path) else []


def pgrep(pattern: str) -> list[str]:
    """`pgrep -af PATTERN`, without pgrep itself."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if not line.split(maxsplit=1)[1].startswith("pgrep")]


def unit_failures(out: str) -> list[dict]:
    failures = RunDir(out).read_folder("failures")
    return [] if failures is None else [r for r in failures.to_pylist() if r["kind"] == "unit"]


def cigma(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a session of its own (so that its Ray processes can be found and killed)."""
    proc = subprocess.Popen(CLI + list(args), env=env or ray_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    for tracker in _TRACKERS:
        tracker.add_session(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


class ExecutorWatch(threading.Thread):
    """Watches `pipeline.executor` while the pipeline runs on Ray in the main thread; `act(executor)` may fault it."""

    def __init__(self, pipeline: Pipeline, act=None):
        super().__init__(name="executor-watch", daemon=True)
        self.pipeline, self.act = pipeline, act
        self.executor = None
        self.slots = 0  # replicas the executor created (alive or starting)
        self.pids: set[int] = set()  # processes of the replicas seen alive
        self.acted = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(0.02):
                executor = self.pipeline.executor
                if not isinstance(executor, RayExecutor):
                    continue
                self.executor = executor
                self.slots = max(self.slots, len(executor.slots))
                self.pids |= {info["pid"] for info in executor.actor_infos() if info}
                if self.act is not None and self.acted is None:
                    self.acted = self.act(executor)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.join(10)
        if self.error is not None:
            raise self.error


# -- 1. replicas ------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("replicas", [1, 2])
def test_local_ray_replicas_match_single_process(tmp_path, fast_run, procs, replicas):
    pipeline = Pipeline(fast_run.job(str(tmp_path / "run")), progress=False)
    watch = ExecutorWatch(pipeline)
    watch.start()
    try:
        with ray_executor(pipeline.job, "local", replicas, num_cpus=2) as executor:
            pipeline.run_all(executor)
    finally:
        watch.finish()
    # the executor cleans up what it started, and the pipeline is back on its own executor
    assert not ray.is_initialized() and isinstance(pipeline.executor, LocalExecutor)
    assert any("raylet" in c for c in procs.seen.values())  # the tracker sees the cluster (and checks it is gone)
    assert watch.slots == replicas  # that many actors; units ran in them, not here
    assert 1 <= len(watch.pids) <= replicas and os.getpid() not in watch.pids
    assert watch.executor.retries == 0 and watch.executor.replaced == 0
    assert_same_rankings(pipeline.job.out, fast_run)
    assert_deltas_exact(pipeline.job.out, fast_run)
    assert unit_files(pipeline.job.out, "deltas") == sorted(u.file.split("/")[1] for u in fast_run.scan_units)


# -- 2. a worker process dies mid-unit ----------------------------------------------------------------
@pytest.mark.timeout(400)
def test_killed_replica_is_replaced_and_results_are_identical(tmp_path, slow_run, procs):
    out = str(tmp_path / "run")
    pipeline = Pipeline(slow_run.job(out), progress=False)

    def kill_a_busy_replica(executor):
        masks, deltas = len(unit_files(out, "masks")), len(unit_files(out, "deltas"))
        if masks < 2 and deltas < 1:  # the first units are done: the replicas are warm
            return None
        for slot in list(executor.slots):
            try:
                # it runs one unit and has another queued: even if the first one ends as it is killed,
                # the second is lost with the process
                busy = slot.alive and slot.info.get("pid") and len(slot.units) >= 2 and slot.units[0][1].file
            except IndexError:  # a unit just finished
                continue
            if busy:
                os.kill(slot.info["pid"], signal.SIGKILL)
                return {"pid": slot.info["pid"], "masks": masks, "deltas": deltas, "unit": busy}
        return None

    watch = ExecutorWatch(pipeline, kill_a_busy_replica)
    watch.start()
    try:
        with ray_executor(pipeline.job, "local", 2, num_cpus=2) as executor:
            pipeline.run_all(executor)
    finally:
        watch.finish()
    assert watch.acted is not None, "the run ended before a replica could be killed mid-stage; make units slower"
    assert watch.acted["pid"] != os.getpid()
    executor = watch.executor
    assert executor.replaced >= 1 and executor.retries >= 1, (watch.acted, executor.replaced, executor.retries)
    assert_same_rankings(out, slow_run)
    assert_deltas_exact(out, slow_run)
    assert unit_failures(out) == []


# -- 2b. the adaptive scan on two replicas, one of them killed mid-round --------------------------------------
@pytest.mark.timeout(400)
def test_adaptive_scan_on_two_replicas_with_one_killed_equals_the_in_process_one(tmp_path, slow_run, procs):
    """`scan --adaptive` runs its rounds' units on the same executor: on two replicas, with one killed while it
    runs an adaptive unit, the ranking is the in-process adaptive scan's and its top K the exhaustive one's."""
    cfg = slow_run.cfg.replace(adaptive=True, delta=0.5, adaptive_first=4, adaptive_growth=1.5)
    local = str(tmp_path / "local")
    os.makedirs(local)
    for folder in ("predictions", "masks"):
        shutil.copytree(os.path.join(slow_run.out, folder), os.path.join(local, folder))
    Pipeline(Job(model=slow_run.spec, data=slow_run.data, out=local, config=cfg), progress=False).run_all()
    want = pq.read_table(os.path.join(local, "rankings.parquet"))

    out = str(tmp_path / "run")
    pipeline = Pipeline(Job(model=slow_run.spec, data=slow_run.data, out=out, config=cfg), progress=False)

    def kill_a_replica_in_an_adaptive_round(executor):
        for slot in list(executor.slots):
            try:
                busy = (slot.alive and slot.info.get("pid") and len(slot.units) >= 2
                        and slot.units[0][1].subdir.startswith("adaptive/") and slot.units[0][1].file)
            except IndexError:
                continue
            if busy:
                os.kill(slot.info["pid"], signal.SIGKILL)
                return {"pid": slot.info["pid"], "unit": busy}
        return None

    watch = ExecutorWatch(pipeline, kill_a_replica_in_an_adaptive_round)
    watch.start()
    try:
        with ray_executor(pipeline.job, "local", 2, num_cpus=2) as executor:
            pipeline.run_all(executor)
    finally:
        watch.finish()
    assert watch.acted is not None, "the run ended before a replica could be killed in an adaptive round"
    assert watch.slots >= 2 and watch.executor.replaced >= 1 and watch.executor.retries >= 1
    got = pq.read_table(os.path.join(out, "rankings.parquet"))
    for column in ("layer", "head", "rank", "n", "in_top_k", "decided_early", "decided_round"):
        assert got[column].to_pylist() == want[column].to_pylist(), column
    for column in ("score", "ci_low", "ci_high"):
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=0, atol=1e-6, err_msg=column)
    k = cfg.k_of(len(slow_run.heads))
    top = lambda t: {(r["layer"], r["head"]) for r in t.slice(0, k).to_pylist()}
    assert top(got) == top(slow_run.rankings)
    assert RunDir(out).read_json("adaptive.json") == RunDir(local).read_json("adaptive.json")
    assert unit_failures(out) == []


# -- 3. a poison unit -------------------------------------------------------------------------------
@pytest.mark.timeout(500)
def test_poison_unit_is_given_up_reported_and_retried_by_the_same_command(tmp_path, fast_run, procs):
    out = str(tmp_path / "run")
    poison = fast_run.scan_units[4].file  # a scan unit in the middle of the stage
    args = fast_run.cli_args(out, str(tmp_path / "c.yaml"), "--address", "local", "--replicas", "2", "--quiet")

    first = cigma(*args, env=ray_env(CIGMA_FAIL_UNITS=poison))
    assert first.returncode == 1, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr[-6000:]}"
    assert poison in first.stderr and "3 attempts" in first.stderr, first.stderr
    assert "retry the failed units with the same command" in first.stderr
    assert "cigma-ray scan " in first.stderr and f"--out {out}" in first.stderr  # the command to run again
    assert "Traceback" not in first.stderr
    failures = unit_failures(out)
    assert [(f["unit"], f["stage"], f["attempts"]) for f in failures] == [(poison, "scan", FAST.max_attempts)]
    assert "died" in failures[0]["error"]
    done = unit_files(out, "deltas")
    assert done == sorted(u.file.split("/")[1] for u in fast_run.scan_units if u.file != poison)  # the rest finished
    assert not os.path.exists(os.path.join(out, "rankings.parquet"))
    kept = {n: os.stat(os.path.join(out, "deltas", n)).st_mtime_ns for n in done}

    status = ok(cigma("status", out))
    assert f"failed   {poison} after {FAST.max_attempts} attempts" in status.stdout, status.stdout
    scan_total = len(fast_run.scan_units)
    assert f"scan     {scan_total - 1}/{scan_total} units  (1 missing)" in status.stdout, status.stdout
    assert "ranked   no" in status.stdout and "run the same scan command again" in status.stdout

    ok(cigma(*args))  # the cause is gone: the same command finishes the run
    assert_same_rankings(out, fast_run)
    assert_deltas_exact(out, fast_run)
    assert unit_failures(out) == [] and not os.path.exists(os.path.join(out, "failures", "unit-" + poison.replace("/", "-")))
    assert {n: os.stat(os.path.join(out, "deltas", n)).st_mtime_ns for n in done} == kept  # only the poison unit ran
    status = ok(cigma("status", out))
    assert "failed " not in status.stdout and "ranked   yes" in status.stdout


# -- 4 and 7. the driver dies -------------------------------------------------------------------
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent/main.py")


@pytest.mark.timeout(500)
def test_killed_driver_leaves_a_run_the_same_command_finishes(tmp_path, slow_run, procs, ray_tmpdir):
    out = str(tmp_path / "run")
    args = slow_run.cli_args(out, str(tmp_path / "c.yaml"), "--address", "local", "--replicas", "2")
    n_scan = len(slow_run.scan_units)
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(CLI + args, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    procs.add_session(driver.pid)
    try:
        wait_for(lambda: len(unit_files(out, "deltas")) >= 1 or driver.poll() is not None, 300, "the first deltas files")
        started = procs.living(sid=driver.pid)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its Ray processes must go by themselves
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-4000:]
    started.update(procs.living(sid=driver.pid))
    assert any("gcs_server" in c for c in started.values()) and any("raylet" in c for c in started.values())
    assert any("ReplicaActor" in c for c in started.values()), sorted(started.values())

    # What the driver started goes with it: GCS, raylet and the replicas at once. Ray's own dashboard and
    # runtime-env agents linger (~1-2 min, retrying the dead GCS); they are killed at the end of the test.
    procs.tolerated = RAY_AGENTS
    core = {k: c for k, c in started.items() if not any(a in c for a in RAY_AGENTS)}
    left = procs.wait_gone(core, 60)
    assert not left, f"Ray processes outlived their driver by 60 s: {sorted(left.values())}"
    # the same, by command line: nothing that names this test's Ray directory runs any more
    wait_for(lambda: not pgrep(ray_tmpdir), 30, f"processes naming {ray_tmpdir} to exit", interval=0.5)

    deltas = unit_files(out, "deltas")  # the replicas are gone: nothing is written any more
    assert 1 <= len(deltas) < n_scan, f"{len(deltas)} of {n_scan} scan units were done at the kill; make them slower"
    assert not os.path.exists(os.path.join(out, "rankings.parquet"))
    before = {n: (os.stat(os.path.join(out, "deltas", n)).st_ino, os.stat(os.path.join(out, "deltas", n)).st_mtime_ns)
              for n in deltas}

    # 7. status on the partial run lists what is missing
    status = ok(cigma("status", out))
    n_masks = len(slow_run.mask_units)
    n_predict = len(slow_run.predict_units)
    assert f"predict  {n_predict}/{n_predict} units\n" in status.stdout, status.stdout
    assert f"mask     {n_masks}/{n_masks} units\n" in status.stdout, status.stdout
    assert f"scan     {len(deltas)}/{n_scan} units  ({n_scan - len(deltas)} missing)" in status.stdout, status.stdout
    assert "ranked   no" in status.stdout

    second = ok(cigma(*args))
    assert "predict" not in second.stderr and "mask:" not in second.stderr  # finished stages are not run again
    after = {n: (os.stat(os.path.join(out, "deltas", n)).st_ino, os.stat(os.path.join(out, "deltas", n)).st_mtime_ns)
             for n in deltas}
    assert after == before  # finished units were not recomputed
    assert_deltas_exact(out, slow_run)
    assert_same_rankings(out, slow_run)
    status = ok(cigma("status", out))
    assert f"scan     {n_scan}/{n_scan} units\n" in status.stdout and "ranked   yes" in status.stdout


@pytest.mark.timeout(200)
def test_status_counts_missing_units_of_a_partial_run(tmp_path, fast_run, procs):
    out = str(tmp_path / "run")
    shutil.copytree(fast_run.out, out)
    os.remove(os.path.join(out, "rankings.parquet"))
    scan = fast_run.scan_units
    for unit in (scan[0], scan[-1], fast_run.mask_units[1]):
        os.remove(os.path.join(out, unit.file))
    status = ok(cigma("status", out))
    n_masks, n_scan = len(fast_run.mask_units), len(scan)
    assert f"mask     {n_masks - 1}/{n_masks} units  (1 missing)" in status.stdout, status.stdout
    assert f"scan     {n_scan - 2}/{n_scan} units  (2 missing)" in status.stdout, status.stdout
    assert "ranked   no" in status.stdout

    shutil.rmtree(os.path.join(out, "predictions"))  # D is not known yet
    status = ok(cigma("status", out))
    assert "predict  0/" in status.stdout and "mask, scan: planned once predict is complete" in status.stdout

    # the same command finishes it, without Ray, to the same rankings
    ok(cigma(*fast_run.cli_args(out, str(tmp_path / "c.yaml"), "--quiet")))
    assert_same_rankings(out, fast_run)


@pytest.mark.timeout(300)
def test_status_exits_0_every_time_on_a_busy_machine(tmp_path, fast_run, procs):
    """`cigma-ray status` is what scripts poll; it must not abort at exit. (It did: pyarrow, reading Parquet from
    io.BytesIO, leaves a scanner thread that takes the GIL during interpreter shutdown -> std::terminate, SIGABRT,
    about one run in five when the CPUs are busy. A gc.collect() before the CLI returns avoids it.)"""
    from concurrent.futures import ThreadPoolExecutor

    out = str(tmp_path / "run")
    shutil.copytree(fast_run.out, out)
    os.remove(os.path.join(out, "rankings.parquet"))
    os.remove(os.path.join(out, fast_run.scan_units[0].file))
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    procs.add_session(burner.pid)
    try:
        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda _: cigma("status", out, timeout=120), range(16)))
    finally:
        burner.kill()
        burner.wait()
    codes = [r.returncode for r in runs]
    assert all("(1 missing)" in r.stdout for r in runs)  # the output itself is complete every time
    assert codes == [0] * len(runs), f"exit codes {codes}: {[r.stderr for r in runs if r.returncode][:1]}"


# -- 5. a node dies -----------------------------------------------------------------------------------
@pytest.mark.timeout(500)
def test_lost_worker_node_run_completes_with_identical_results(tmp_path, slow_run, procs):
    out = str(tmp_path / "run")
    logs = tmp_path / "nodes"
    logs.mkdir()
    nodes = RayNodes(procs, str(logs))
    try:
        nodes.start_head(num_cpus=0)
        workers = [nodes.add_worker(num_cpus=1), nodes.add_worker(num_cpus=1)]
        args = slow_run.cli_args(out, str(tmp_path / "c.yaml"), "--address", nodes.address, "--replicas", "2")
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen(CLI + args, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.add_session(driver.pid)
        try:
            n_masks, n_scan = len(slow_run.mask_units), len(slow_run.scan_units)

            def busy_node():
                """A worker node whose replica is running a unit, in a stage with units still to hand out."""
                if driver.poll() is not None:
                    return "the driver exited"
                masks, deltas = len(unit_files(out, "masks")), len(unit_files(out, "deltas"))
                if not (2 <= masks <= n_masks - 4 or 1 <= deltas <= n_scan - 12):
                    return None
                for node in workers:  # a replica's process is titled ray::ReplicaActor.run while it runs a unit
                    if any("ReplicaActor.run" in c for c in procs.living(sid=node.pid).values()):
                        return node
                return None

            victim = wait_for(busy_node, 300, "a replica busy with a unit")
            assert victim in workers, (tmp_path / "driver.log").read_text()[-4000:]
            nodes.kill(victim)  # the node's raylet, agents and its replica's process, mid-unit
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        text = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, text[-6000:]
        assert "retries" in text  # the killed node's unit ran again elsewhere
        assert not procs.living(sid=victim.pid)
    finally:
        nodes.close()
    assert_same_rankings(out, slow_run)
    assert_deltas_exact(out, slow_run)
    assert unit_failures(out) == []


@pytest.mark.timeout(300)
def test_non_finite_logits_fail_a_unit_at_once_without_retries(tmp_path, image_folder, tiny_checkpoint, procs):
    """A model that returns NaN logits fails every unit the same way: each is given up after one attempt, with
    the model named, instead of max_attempts tries (and nothing is written for it)."""
    from cigma_ray.pipeline.units import predict_units

    path, name, kwargs = tiny_checkpoint
    state = torch.load(path)
    state["head.bias"][1] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    job = Job(model=ModelSpec(f"timm:{name}", checkpoint=str(tmp_path / "nan.pth"), model_kwargs=kwargs),
              data=image_folder, out=str(tmp_path / "run"), config=FAST)
    units = predict_units(len(open_source(image_folder)), FAST)[:2]
    done = []
    with ray_executor(job, "local", 1, num_cpus=1) as executor:
        failures = executor.run(units, lambda unit, receipt: done.append(unit))
        retries = executor.retries
    assert done == [] and retries == 0 and FAST.max_attempts == 3
    assert [(f.unit, f.attempts) for f in failures] == [(u, 1) for u in units]
    assert all(f"timm:{name} returned NaN class logits" in f.error for f in failures), failures[0].error
    assert not os.path.exists(tmp_path / "run" / "predictions")


# -- 6. bad input ---------------------------------------------------------------------------------
def closed_port() -> int:
    return free_port()  # bound and released: nobody listens on it


@pytest.mark.timeout(300)
@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_unreachable_address_fails_fast_and_writes_nothing(tmp_path, fast_run, procs, address):
    address = address.format(port=closed_port())
    out = tmp_path / "run"
    start = time.monotonic()
    proc = cigma(*fast_run.cli_args(str(out), str(tmp_path / "c.yaml"), "--address", address), timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert f"--address {address}" in proc.stderr and "cannot connect" in proc.stderr, proc.stderr
    assert "ray start --head" in proc.stderr  # what to do
    assert "Traceback" not in proc.stderr
    assert took < 90, f"took {took:.0f} s to give up"
    assert not out.exists()


@pytest.mark.timeout(300)
def test_auto_address_without_a_cluster_is_a_named_error(tmp_path, fast_run, procs):
    out = tmp_path / "run"
    proc = cigma(*fast_run.cli_args(str(out), str(tmp_path / "c.yaml"), "--address", "auto"), timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert "--address auto" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replicas", [[], ["--replicas", "1"]], ids=["default-replicas", "one-replica"])
def test_more_gpus_per_replica_than_the_cluster_has_is_a_named_error(tmp_path, fast_run, procs, replicas):
    out = tmp_path / "run"
    proc = cigma(*fast_run.cli_args(str(out), str(tmp_path / "c.yaml"), "--address", "local",
                                    "--gpus-per-replica", "4", *replicas), timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "GPU" in proc.stderr, proc.stderr
    # the error names the setting the user gave, not one derived from it
    assert "--gpus-per-replica 4" in proc.stderr, proc.stderr
    assert not (out / "run.json").exists() and not out.exists()
