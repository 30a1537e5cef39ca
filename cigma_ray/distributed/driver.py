"""Run a validated pipeline's units on a Ray cluster, from the same command as a local run."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import ray

from ..pipeline.units import Job
from .executor import ClusterError, RayExecutor, check_resources, connect


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[None]:
    """Connected to Ray within the block; a Ray started here (not one already connected) is shut down after it."""
    started_here = not ray.is_initialized()
    connect(address, num_cpus)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def cluster_has_gpus() -> bool:
    """Whether replicas get GPUs by default (--gpus-per-replica not given): the connected cluster has any."""
    return ray.cluster_resources().get("GPU", 0) >= 1


def plan_replicas(replicas: int | None, cpus: float, gpus: float | None) -> tuple[int, float]:
    """(replicas, gpus per replica): by default one replica per GPU, or per `cpus` CPUs without GPUs."""
    total = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if cluster_has_gpus() else 0.0
    check_resources(cpus, gpus)
    if replicas is None:
        replicas = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 0) // cpus)
    if replicas < 1:
        raise ClusterError(f"--replicas {replicas}: needs at least one replica "
                           f"(the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs)")
    return replicas, gpus


@contextlib.contextmanager
def ray_executor(job: Job, address: str, replicas: int | None = None, cpus_per_replica: float = 1.0,
                 gpus_per_replica: float | None = None, num_cpus: int | None = None) -> Iterator[RayExecutor]:
    """Connect, start the replica actors for `job`, and always clean up (Ray too, if started here).

    Replicas that hold GPUs run on CUDA even when the job says cpu (the driver validated on its CPU)."""
    with ray_session(address, num_cpus):
        executor = None
        try:
            replicas, gpus = plan_replicas(replicas, cpus_per_replica, gpus_per_replica)
            if gpus and job.device == "cpu":
                job = dataclasses.replace(job, device="cuda")
            executor = RayExecutor(job, replicas, cpus_per_replica, gpus, job.config.max_attempts)
            executor.start()
            yield executor
        finally:
            if executor is not None:
                executor.shutdown()
