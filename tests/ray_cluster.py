"""Test support for real Ray clusters: process tracking, `ray start` nodes, free ports.

Every Ray process a test starts is found by polling /proc: the descendants of this (pytest)
process and every process of a session the test opened (each CLI run and each `ray start` node
runs in its own session, so the workers its raylet starts stay findable after their parents
die). Teardown checks that none is left and SIGKILLs, by pid, only what the test started; it
never runs `ray stop`, which would also stop other people's clusters on this machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    start: int  # clock ticks after boot: (pid, start) names a process even after its pid is reused
    state: str
    cmd: str


def proc_table() -> dict[int, Proc]:
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(name)] = Proc(int(name), int(rest[1]), int(rest[3]), int(rest[19]), rest[0], cmd)
    return table


def alive(pid: int, start: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return rest[0] not in ("Z", "X") and int(rest[19]) == start


class ProcessTracker:
    """Remembers every process started by this process or in the sessions added, until `close`."""

    def __init__(self, interval: float = 0.25):
        self.me = os.getpid()
        self.interval = interval
        self.sessions: set[int] = set()
        self.seen: dict[tuple[int, int], str] = {}
        self._before = {(p.pid, p.start) for p in proc_table().values()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-tracker", daemon=True)
        self._thread.start()

    def add_session(self, sid: int) -> None:
        with self._lock:
            self.sessions.add(sid)
        self.poll()

    def poll(self) -> None:
        table = proc_table()
        children: dict[int, list[int]] = {}
        for p in table.values():
            children.setdefault(p.ppid, []).append(p.pid)
        with self._lock:
            ours = {p.pid for p in table.values() if p.sid in self.sessions}
            stack = [self.me, *ours]
            while stack:
                for child in children.get(stack.pop(), []):
                    if child not in ours:
                        ours.add(child)
                        stack.append(child)
            for pid in ours - {self.me}:
                p = table[pid]
                key = (p.pid, p.start)
                if key not in self._before and (p.cmd or key not in self.seen):
                    self.seen[key] = p.cmd or self.seen.get(key, "")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a process vanished mid-read; the next poll sees the rest
                pass

    def living(self, pattern: str | None = None, sid: int | None = None) -> dict[tuple[int, int], str]:
        """The tracked processes still alive, optionally those whose command line holds `pattern` or in session `sid`."""
        self.poll()
        table = proc_table()
        with self._lock:
            found = {k: c for k, c in self.seen.items() if alive(*k)}
        if pattern is not None:
            found = {k: c for k, c in found.items() if pattern in c}
        if sid is not None:
            found = {k: c for k, c in found.items() if k[0] in table and table[k[0]].sid == sid}
        return found

    def wait_gone(self, keys, timeout: float) -> dict[tuple[int, int], str]:
        """Wait until the given processes exit; returns those still alive after `timeout` seconds."""
        keys = dict(keys)
        deadline = time.monotonic() + timeout
        while True:
            left = {k: c for k, c in keys.items() if alive(*k)}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def kill(self, keys) -> None:
        for pid, start in keys:
            if alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self, grace: float = 30.0, tolerated: tuple[str, ...] = ()) -> dict[tuple[int, int], str]:
        """Stop tracking; wait `grace` seconds for every tracked process to exit (but not for those whose command
        line holds one of `tolerated`), SIGKILL the rest and return them."""
        self.poll()
        self._stop.set()
        self._thread.join()
        expected = {k: c for k, c in self.seen.items() if not any(t in c for t in tolerated)}
        left = self.wait_gone(expected, grace)
        left.update({k: c for k, c in self.seen.items() if k not in expected and alive(*k)})
        self.kill(left)
        self.wait_gone(left, 10)
        return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def ray_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CIGMA_FAIL_UNITS", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


class RayNodes:
    """A head and worker nodes started with `ray start --block`, each its own session, killed by session."""

    def __init__(self, tracker: ProcessTracker, log_dir: str):
        self.tracker = tracker
        self.log_dir = log_dir
        self.nodes: list[subprocess.Popen] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"node{len(self.nodes)}.log"), "w")
        cmd = [RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
               "--object-store-memory", str(100 * 1024 * 1024), "--dashboard-agent-listen-port", str(free_port()), "--block"]
        proc = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.nodes.append(proc)
        self.tracker.add_session(proc.pid)
        return proc

    def log(self, k: int) -> str:
        with open(os.path.join(self.log_dir, f"node{k}.log")) as f:
            return f.read()

    def start_head(self, num_cpus: int = 0) -> subprocess.Popen:
        proc = self._start(["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--include-dashboard", "false",
                            "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())])

        def gcs_listens():
            assert proc.poll() is None, f"the head node exited:\n{self.log(0)}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(gcs_listens, 120, f"the Ray head on {self.address}", interval=0.2)
        return proc

    def add_worker(self, num_cpus: int = 1, timeout: float = 150) -> subprocess.Popen:
        """Start a worker node and wait until the cluster counts it (one at a time: nodes starting together on one
        machine pick the same socket and log names)."""
        expected = len(self.nodes) + 1
        proc = self._start(["--address", self.address, "--num-cpus", str(num_cpus)])
        probe = subprocess.Popen(
            [sys.executable, "-c", WAIT_FOR_NODES, self.address, str(expected), str(timeout)], env=ray_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.tracker.add_session(probe.pid)
        try:
            out, _ = probe.communicate(timeout=timeout + 60)
        finally:
            if probe.poll() is None:
                os.killpg(probe.pid, signal.SIGKILL)
                probe.wait()
        assert probe.returncode == 0, f"worker node {len(self.nodes) - 1} did not join:\n{out}\n{self.log(len(self.nodes) - 1)}"
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's whole session (`ray start`, raylet, agents and its workers, which have their own groups)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.tracker.kill(self.tracker.living(sid=proc.pid))
        proc.wait()

    def close(self) -> None:
        for proc in reversed(self.nodes):
            self.kill(proc)


WAIT_FOR_NODES = """
import sys, time
import ray
address, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + timeout
alive = []
while time.monotonic() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= expected:
        break
    time.sleep(0.2)
print(len(alive), "nodes alive:", ray.cluster_resources())
ray.shutdown()
sys.exit(0 if len(alive) >= expected else 1)
"""
