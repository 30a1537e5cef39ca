"""What `cigma-ray export --smaller` buys: the forward of the zeroed model (a) against the smaller one (b).

    python benchmarks/bench_export.py [--model vit_tiny_patch16_224] [--fractions 0.25,0.5] [--device cpu]

Random weights; for each fraction, that share of heads (a seeded random draw) is removed. (a) and
(b) are timed in alternation in the same process, so a busy machine slows both alike; each gets
the best of its repeats after a warm-up. The JSON goes to benchmarks/results/ with the machine.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cigma_ray.bench import machine
from cigma_ray.evaluation import random_heads
from cigma_ray.models import ModelSpec, load
from cigma_ray.models.surgery import (
    attentions_of,
    heads_per_layer_of,
    parameters,
    plain_timm_model,
    smaller_model,
    zeroed_state_dict,
)

RESULTS = Path(__file__).parent / "results"


def best_times(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best wall time of each model's forward, the models taking turns in every repeat."""
    def forward(model: torch.nn.Module) -> float:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    best = {name: float("inf") for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                best[name] = min(best[name], forward(model))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--fractions", default="0.25,0.5", help="shares of the heads removed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    lm = load(ModelSpec(f"timm:{args.model}", random_weights=True))
    adapter, device = lm.adapter, torch.device(args.device)
    x = torch.randn(args.batch_size, 3, *adapter.input_size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        heads = random_heads(adapter.heads, round(fraction * len(adapter.heads)), seed=0)
        zeroed = plain_timm_model(args.model, lm.num_classes, {}, zeroed_state_dict(attentions_of(lm), adapter.model, heads))
        small = smaller_model(zeroed, heads)
        zeroed, small = zeroed.to(device), small.to(device)
        with torch.inference_mode():
            diff = float((zeroed(x) - small(x)).abs().max())
        seconds = best_times({"zeroed": zeroed, "smaller": small}, x, args.repeats)
        rows.append({"fraction": fraction, "heads_removed": len(heads), "heads_per_layer": heads_per_layer_of(small),
                     "parameters_zeroed": parameters(zeroed), "parameters_smaller": parameters(small),
                     "images_per_s_zeroed": args.batch_size / seconds["zeroed"],
                     "images_per_s_smaller": args.batch_size / seconds["smaller"],
                     "speedup": seconds["zeroed"] / seconds["smaller"], "max_abs_logit_diff": diff})

    info = machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]
    print(f"{args.model}, random weights, fp32, batch {args.batch_size}, best of {args.repeats}, on {where} "
          f"({info['torch_threads']} threads)")
    print(f"{'removed':>12}  {'params (a)':>10}  {'params (b)':>10}  {'(a) img/s':>9}  {'(b) img/s':>9}  "
          f"{'speed-up':>8}  {'max |dlogit|':>12}  heads per layer (b)")
    for r in rows:
        print(f"{r['heads_removed']:>4} ({r['fraction']:.0%})  {r['parameters_zeroed']:>10,}  {r['parameters_smaller']:>10,}  "
              f"{r['images_per_s_zeroed']:>9.1f}  {r['images_per_s_smaller']:>9.1f}  {r['speedup']:>7.2f}x  "
              f"{r['max_abs_logit_diff']:>12.1e}  {' '.join(map(str, r['heads_per_layer']))}")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = {"benchmark": "export", "date": date, "model": args.model, "device": where, "precision": "fp32",
              "batch_size": args.batch_size, "repeats": args.repeats, "machine": info, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"export-{args.model}-{device.type}-fp32-{date[:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
