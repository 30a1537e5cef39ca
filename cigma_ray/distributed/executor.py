"""The Ray driver: replica actors, a bounded window of units in flight, retries, replacements.

The driver never touches tensors or result rows. It sends each actor a unit descriptor (image
ids, layer range, input files); the actor reads its inputs from the run directory, writes the
unit's Parquet file itself and returns a small receipt. When an actor dies (its process, or its
node), the unit it was running is charged one attempt and queued again, the units queued
behind it go back without a charge, and a new actor takes its place. A unit that fails
`max_attempts` times is given up and reported, and the rest of the stage goes on. A unit whose
model raised a ModelError (NaN or infinite logits, say: the same inputs fail the same way) is
given up at once.
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..config import ConfigError
from ..models import ModelError
from ..pipeline.executor import Failure
from ..pipeline.units import Job, Unit
from ..pipeline.worker import Worker

FAIL_UNITS_ENV = "CIGMA_FAIL_UNITS"  # fault injection for resilience tests: unit files whose actor dies


class ClusterError(ConfigError):
    """A cluster that cannot run the job; the message names the setting and the fix."""


@ray.remote(max_restarts=0, max_task_retries=0)
class ReplicaActor:
    """One model replica: loads the model once, then does units one at a time."""

    def __init__(self, job: Job, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.worker = Worker(job)

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def run(self, unit: Unit) -> dict:
        if unit.file in os.environ.get(FAIL_UNITS_ENV, "").split(","):
            os._exit(1)  # a poison unit: the process dies as on a segfault or an OOM kill
        return self.worker.run_unit(unit)


@dataclass
class Slot:
    """An actor and the units sent to it, oldest first (actors run them in order)."""

    actor: ray.actor.ActorHandle
    ready: ray.ObjectRef
    started: float = field(default_factory=time.monotonic)
    units: deque = field(default_factory=deque)  # (ref, unit)
    alive: bool = False
    info: dict = field(default_factory=dict)


class RayExecutor:
    """Runs units on `replicas` actors; survives lost actors and nodes."""

    def __init__(self, job: Job, replicas: int = 1, cpus_per_replica: float = 1, gpus_per_replica: float = 0,
                 max_attempts: int = 3, window_per_replica: int = 2, start_timeout_s: float = 600,
                 actor_cls=ReplicaActor):
        self.job = job
        self.actor_cls = actor_cls
        self.replicas = replicas
        self.cpus = cpus_per_replica
        self.gpus = gpus_per_replica
        self.max_attempts = max_attempts
        self.window = window_per_replica
        self.start_timeout_s = start_timeout_s
        self.slots: list[Slot] = []
        self.retries = 0
        self.replaced = 0
        self.started_once = False

    # -- actors -------------------------------------------------------------------------------
    def _new_slot(self) -> Slot:
        threads = max(1, int(self.cpus)) if not self.gpus else None
        actor = self.actor_cls.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(self.job, threads)
        return Slot(actor=actor, ready=actor.info.remote())

    def start(self) -> None:
        check_resources(self.cpus, self.gpus)
        self.slots = [self._new_slot() for _ in range(self.replicas)]

    def wait_ready(self) -> None:
        """Block until every replica has loaded its model (benchmarks time the work, not the start)."""
        for slot in self.slots:
            if not slot.alive:
                self._on_ready(slot)

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        self.slots = []

    def _replace(self, slot: Slot) -> None:
        ray.kill(slot.actor, no_restart=True)
        self.slots[self.slots.index(slot)] = self._new_slot()
        self.replaced += 1

    # -- the loop ---------------------------------------------------------------------------
    def run(self, units: list[Unit], on_done: Callable[[Unit, dict], None],
            on_retry: Callable[[Unit, str], None] | None = None,
            on_progress: Callable[[Unit, int], None] | None = None) -> list[Failure]:
        """Run every unit; returns the units given up on. `on_done` gets each unit's receipt (progress
        within a unit is not reported from the replicas: `on_progress` is never called)."""
        if not self.slots:
            self.start()
        pending = deque(units)
        attempts: dict[str, int] = {}
        failures: list[Failure] = []

        def charge(unit: Unit, error: str) -> None:
            attempts[unit.file] = attempts.get(unit.file, 0) + 1
            if attempts[unit.file] >= self.max_attempts:
                failures.append(Failure(unit, attempts[unit.file], error))
            else:
                self.retries += 1
                pending.appendleft(unit)
                if on_retry:
                    on_retry(unit, error)

        while pending or any(s.units for s in self.slots):
            for slot in self.slots:
                if not slot.alive:
                    continue
                while pending and len(slot.units) < self.window:
                    unit = pending.popleft()
                    slot.units.append((slot.actor.run.remote(unit), unit))
            waiting = {s.ready: s for s in self.slots if not s.alive}
            heads = {s.units[0][0]: s for s in self.slots if s.units}
            done, _ = ray.wait(list(heads) + list(waiting), num_returns=1, timeout=1.0)
            for ref in done:
                if ref in waiting:
                    self._on_ready(waiting[ref])
                    continue
                slot = heads[ref]
                _, unit = slot.units.popleft()
                try:
                    receipt = ray.get(ref)
                except RayTaskError as e:  # the unit raised; the actor is fine
                    if isinstance(e.cause, ModelError):  # the model fails on these inputs (non-finite logits, say):
                        attempts[unit.file] = attempts.get(unit.file, 0) + 1  # another try would fail the same way
                        failures.append(Failure(unit, attempts[unit.file], str(e.cause)))
                        continue
                    charge(unit, str(e.cause) if e.cause else str(e))
                    continue
                except RayActorError as e:  # the actor (or its node) died while running this unit
                    charge(unit, f"replica died: {type(e).__name__}")
                    pending.extendleft(reversed([u for _, u in slot.units]))
                    slot.units.clear()
                    self._replace(slot)
                    continue
                on_done(unit, receipt)
            self._check_starting()
        return failures

    def _on_ready(self, slot: Slot) -> None:
        try:
            slot.info = ray.get(slot.ready)
            slot.alive = True
            self.started_once = True
        except RayActorError as e:
            if not self.started_once:  # no replica ever started: the cause is not transient
                raise ClusterError(f"replicas cannot start: {e}") from None
            self._replace(slot)

    def _check_starting(self) -> None:
        """Give up when no replica has been able to start for start_timeout_s."""
        if any(s.alive for s in self.slots):
            return
        oldest = min(s.started for s in self.slots)
        if time.monotonic() - oldest > self.start_timeout_s:
            raise ClusterError(f"no replica started in {self.start_timeout_s:.0f} s: the cluster has no room for "
                               f"{self.cpus} CPUs and {self.gpus} GPUs per replica (check `ray status`)")

    def actor_infos(self) -> list[dict]:
        """pid and node of each live actor (for tests and status lines)."""
        return [s.info for s in self.slots if s.alive]


def address_parts(address: str) -> tuple[str, int] | None:
    """(host, port) of an address, None for local/auto; a malformed address is an error."""
    if address in ("local", "auto"):
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or not port or parsed.scheme not in ("gcs", "ray"):
        raise ClusterError(f"--address {address!r}: use local, auto, HOST:PORT or ray://HOST:PORT")
    return parsed.hostname, port


def check_address(address: str) -> None:
    """Fail fast on a host:port nobody listens on, before Ray's own long retries."""
    parts = address_parts(address)
    if parts is None:
        return
    try:
        with socket.create_connection(parts, timeout=5):
            pass
    except OSError as e:
        raise ClusterError(f"--address {address}: cannot connect ({e.strerror or e}); is the Ray head running "
                           "(`ray start --head`, or the KubeRay head service)?") from None


def connect(address: str, num_cpus: int | None = None) -> None:
    """ray.init for `local` (a fresh in-process cluster), `auto` (this machine's cluster) or an address."""
    check_address(address)
    if ray.is_initialized():
        return
    kwargs = {"log_to_driver": False, "configure_logging": False}
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        return
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ClusterError(f"--address {address}: {e}") from None


def check_resources(cpus: float, gpus: float) -> None:
    """A replica must fit on some live node; otherwise it would wait forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if gpus and not any(r.get("GPU", 0) >= gpus for r in nodes):
        most = max((r.get("GPU", 0) for r in nodes), default=0)
        raise ClusterError(f"--gpus-per-replica {gpus:g}: no node of this cluster has that many GPUs "
                           f"(the most on one node is {most:g}); lower it, or add GPU nodes")
    if not any(r.get("CPU", 0) >= cpus for r in nodes):
        most = max((r.get("CPU", 0) for r in nodes), default=0)
        raise ClusterError(f"--cpus-per-replica {cpus:g}: no node of this cluster has that many CPUs "
                           f"(the most on one node is {most:g})")

