"""Ray overhead on one machine: replicas against the in-process engine, scaling, driver dispatch rate.

    RAY_AUTH_MODE=disabled python benchmarks/bench_distributed.py

1. one single-thread replica against the in-process engine on one thread (target >= 0.9);
2. two single-thread replicas against one (target >= 1.7x on 2 cores);
3. the driver alone, with replicas that do nothing, in units dispatched per second (target >= 500).
All three time the scan stage of the same run (its predict and mask stages are done once,
beforehand). Results go to benchmarks/results/ with the machine's description.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from cigma_ray.bench import machine
from cigma_ray.config import Config
from cigma_ray.distributed import RayExecutor
from cigma_ray.models import ModelSpec
from cigma_ray.pipeline import Job, LocalExecutor, Pipeline, Unit

RESULTS = Path(__file__).parent / "results"
MODEL = ModelSpec("timm:vit_tiny_patch16_224", random_weights=True, num_classes=2, model_kwargs={"img_size": 96})
CONFIG = Config(tp_ratio=1.0, mask_steps=2, mask_batch=8, unit_images=8, unit_layers=3, bootstrap=0, batch_size=32)


@ray.remote
class IdleActor:
    """The replica interface with no work: what remains is the driver's own cost."""

    def __init__(self, job, threads):
        pass

    def info(self) -> dict:
        return {"pid": os.getpid()}

    def run(self, unit: Unit) -> dict:
        return {"file": unit.file, "rows": 0, "seconds": 0.0}


def make_data(root: Path, per_class: int = 48) -> str:
    rng = np.random.default_rng(0)
    for c in ("0", "1"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def scan_seconds(pipeline: Pipeline, executor, repeats: int = 2) -> tuple[float, int]:
    """Best wall time of the scan stage alone (deltas removed first) on `executor`, and its head x image pairs."""
    pipeline.executor = executor
    units = pipeline.scan_units(pipeline.selected())
    best = float("inf")
    for _ in range(repeats):
        pipeline.run.remove("deltas")
        start = time.perf_counter()
        pipeline.run_stage("scan", units, lambda u: len(u.image_ids) * len(u.heads), "pair")
        best = min(best, time.perf_counter() - start)
    return best, sum(len(u.image_ids) * len(u.heads) for u in units)


def on_ray(pipeline: Pipeline, replicas: int, actor_cls=None) -> tuple[float, int]:
    kwargs = {"actor_cls": actor_cls} if actor_cls else {}
    executor = RayExecutor(pipeline.job, replicas, 1, 0, **kwargs)
    executor.start()
    executor.wait_ready()
    try:
        return scan_seconds(pipeline, executor)
    finally:
        executor.shutdown()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cigma-bench-"))
    try:
        data = make_data(work / "data")
        torch.set_num_threads(1)
        pipeline = Pipeline(Job(MODEL, data, str(work / "run"), CONFIG), progress=False)
        pipeline.run_all()  # predictions and masks, done once
        local_s, pairs = scan_seconds(pipeline, LocalExecutor(lambda: pipeline.worker))

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            one_s, _ = on_ray(pipeline, 1)
            two_s, _ = on_ray(pipeline, 2)
            units = pipeline.scan_units(pipeline.selected())
            many = [Unit("scan", k, u.image_ids, u.layers, u.inputs, u.heads) for k in range(50) for u in units]
            executor = RayExecutor(pipeline.job, 2, 1, 0, actor_cls=IdleActor)
            executor.start()
            executor.wait_ready()
            start = time.perf_counter()
            executor.run(many, lambda unit, receipt: None)
            dispatch = len(many) / (time.perf_counter() - start)
            executor.shutdown()
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "distributed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": MODEL.name, "model_kwargs": MODEL.model_kwargs, "pairs": pairs,
        "in_process_pairs_per_s": pairs / local_s, "one_replica_pairs_per_s": pairs / one_s,
        "two_replicas_pairs_per_s": pairs / two_s,
        "one_replica_over_in_process": local_s / one_s, "two_over_one_replica": one_s / two_s,
        "driver_units_per_s": dispatch,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distributed-cpu-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{pairs} head x image pairs on {result['machine']['cpu']}:")
    print(f"  in process, 1 thread   {result['in_process_pairs_per_s']:8.1f} pairs/s")
    print(f"  1 replica, 1 thread    {result['one_replica_pairs_per_s']:8.1f} pairs/s  ({result['one_replica_over_in_process']:.2f}x in-process, target >= 0.9)")
    print(f"  2 replicas, 1 thread   {result['two_replicas_pairs_per_s']:8.1f} pairs/s  ({result['two_over_one_replica']:.2f}x one replica, target >= 1.7)")
    print(f"  driver alone           {dispatch:8.0f} units/s (target >= 500)")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
