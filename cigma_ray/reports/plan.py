"""`cigma-ray plan`'s output: parameters, memory, placement, forwards, rate and time, with their assumptions."""
from __future__ import annotations

from ..plan import GPUS, OVERHEAD, UTILISATION, PlanSettings


def plan_text(name: str, p: dict, args: PlanSettings) -> str:
    b = 1e9
    prm = p["params"]
    f = p["forwards"]
    total = sum(f.values())
    lines = [
        f"model      {name}",
        f"parameters {prm['total'] / b:.2f} B  (vision {prm['vision'] / b:.2f} B, projector {prm['projector'] / b:.3f} B, "
        f"language {prm['language'] / b:.2f} B)",
        f"memory     {p['memory_gb']:.1f} GB per replica in {args.precision} (weights x {OVERHEAD} for activations "
        "and key/value caches)",
        f"placement  {p['gpus_per_replica']} x {args.gpu} ({GPUS[args.gpu].memory_gb:g} GB) per replica "
        f"(--gpus-per-replica {p['gpus_per_replica']}), {p['replicas_per_node']} replicas per {args.gpus_per_node}-GPU node, "
        f"{p['replicas']} on {args.nodes} node(s)",
        f"images     {args.images} predicted; D = {p['images_in_d']} (accuracy {args.accuracy:g} x tp_ratio {args.tp_ratio:g})",
        f"heads      {p['heads']} scanned ({args.heads}); the language model runs in full for every ablated forward",
        f"forwards   predict {f['predict']:,} + mask {f['mask']:,} (D x (3 x {args.mask_steps} steps + 3)) + "
        f"scan {f['scan']:,} (heads x D x {p['views']}"
        f"{''.join(', ' + k for k in ('measure_fig', 'measure_swap') if getattr(args, k, False))}) = {total:,}",
        f"rate       {p['rate']:.1f} forwards/s per replica ({p['rate'] / p['views']:.1f} head x image pairs/s) "
        + ("(measured, --rate)" if p["rate_measured"] else
           f"(estimate: {p['flops_per_forward'] / 1e12:.2f} TFLOP per forward at {UTILISATION:.0%} of the "
           f"{args.gpu}'s {GPUS[args.gpu].bf16_tflops:g} TFLOP/s bf16 peak; measure with a short scan and pass --rate)"),
        f"time       {p['hours']:.1f} h on {p['replicas']} replicas ({p['gpu_hours']:.0f} GPU-hours)",
    ]
    return "\n".join(lines)
