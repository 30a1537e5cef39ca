"""Run a validated pipeline's stages on a Ray cluster, from the same command as a local run."""
from __future__ import annotations

import dataclasses

import ray

from ..pipeline import Pipeline
from .executor import ClusterError, RayExecutor, check_resources, connect


def plan_replicas(replicas: int | None, cpus: float, gpus: float | None) -> tuple[int, float]:
    """(replicas, gpus per replica): by default one replica per GPU, or per `cpus` CPUs without GPUs."""
    total = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
    check_resources(cpus, gpus)
    if replicas is None:
        replicas = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 0) // cpus)
    if replicas < 1:
        raise ClusterError(f"--replicas {replicas}: needs at least one replica "
                           f"(the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs)")
    return replicas, gpus


def run_on_ray(pipeline: Pipeline, address: str, replicas: int | None = None, cpus_per_replica: float = 1.0,
               gpus_per_replica: float | None = None, num_cpus: int | None = None) -> None:
    """Connect, start the replica actors, run every stage on them, and always clean up."""
    started_here = not ray.is_initialized()
    connect(address, num_cpus)
    executor = None
    try:
        replicas, gpus = plan_replicas(replicas, cpus_per_replica, gpus_per_replica)
        job = pipeline.job
        if gpus and job.device == "cpu":
            job = dataclasses.replace(job, device="cuda")
        executor = RayExecutor(job, replicas, cpus_per_replica, gpus, pipeline.cfg.max_attempts)
        executor.start()
        pipeline.executor = executor
        pipeline.run_all()
    finally:
        if executor is not None:
            executor.shutdown()
        pipeline.executor = None
        if started_here:
            ray.shutdown()
