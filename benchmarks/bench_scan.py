"""Scan throughput: the engine against the paper-style weight-zeroing loop, in the same run.

    python benchmarks/bench_scan.py [--model vit_tiny_patch16_224] [--images 8] [--device cpu] [--precision fp32]

Both compute BIG^(-h) for every head and image (the engine's output is checked against the
loop's); the rate is head x image pairs per second. The model's plain forward rate is measured
too, as the practical roofline. Results go to benchmarks/results/ with the machine's description.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cigma_ray.engine import Replica
from cigma_ray.engine.reference import scan_by_weight_zeroing
from cigma_ray.method import counterfactuals, foreground_cells
from cigma_ray.models import ModelSpec, load
from cigma_ray.models.timm_generic import find_attentions

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    lm = load(ModelSpec(f"timm:{args.model}", random_weights=True), device)
    adapter = lm.adapter
    replica = Replica(lm, args.device, args.precision, args.batch_size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, *adapter.input_size, generator=gen)
    fg = foreground_cells(torch.rand(args.images, 32, 32, generator=gen), 0.35)
    no_bg, _ = counterfactuals(images, fg)
    heads = adapter.heads
    pairs = len(heads) * args.images
    x, x_no_bg = images.to(device), no_bg.to(device)

    forward_s = timed(lambda: replica.logits(x), device, args.repeats)
    engine_s = timed(lambda: replica.scan(images, fg, heads, 1.0), device, args.repeats)
    loop = lambda: scan_by_weight_zeroing(adapter.model, find_attentions(adapter.model), x, x_no_bg, heads,  # noqa: E731
                                          batch_size=args.batch_size)
    loop_s = timed(loop, device, 1)
    error = float((replica.scan(images, fg, heads, 1.0) - loop().cpu()).abs().max()) if args.precision == "fp32" else None

    result = {
        "benchmark": "scan", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": args.model, "device": str(device), "precision": args.precision, "images": args.images,
        "heads": len(heads), "batch_size": args.batch_size,
        "forward_images_per_s": args.images / forward_s,
        "engine_pairs_per_s": pairs / engine_s,
        "paper_loop_pairs_per_s": pairs / loop_s,
        "engine_over_paper_loop": loop_s / engine_s,
        "engine_over_forward": (pairs / engine_s) / (args.images / forward_s),
        "max_abs_difference_fp32": error,
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"scan-{args.model}-{device.type}-{args.precision}-{result['date'][:10]}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} on {result['machine'].get('gpu', result['machine']['cpu'])} ({args.precision}, {args.images} images, "
          f"{len(heads)} heads)")
    print(f"  forward          {result['forward_images_per_s']:10.1f} images/s")
    print(f"  paper-style loop {result['paper_loop_pairs_per_s']:10.1f} head x image pairs/s")
    print(f"  engine           {result['engine_pairs_per_s']:10.1f} head x image pairs/s")
    print(f"  engine / loop    {result['engine_over_paper_loop']:10.2f}x   engine / forward {result['engine_over_forward']:.2f}x")
    if error is not None:
        print(f"  max |engine - loop| = {error:.2e}")
    print(f"saved {RESULTS / name}")


if __name__ == "__main__":
    main()
