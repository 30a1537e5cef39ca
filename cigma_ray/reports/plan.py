"""`cigma-ray plan`'s output: parameters, memory, placement, forwards, rate and time, with their assumptions."""
from __future__ import annotations

from ..method.adaptive import REFERENCE_SAVINGS
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
        + (f"scan {f['scan']:,} (heads x D x {p['views']}{', measure_fig' if p['views'] == 3 else ''})"
           if p["adaptive_saving"] is None else adaptive_scan_text(p, args))
        + f" = {total:,}",
        f"rate       {p['rate']:.1f} forwards/s per replica ({p['rate'] / p['views']:.1f} head x image pairs/s) "
        + ("(measured, --rate)" if p["rate_measured"] else
           f"(estimate: {p['flops_per_forward'] / 1e12:.2f} TFLOP per forward at {UTILISATION:.0%} of the "
           f"{args.gpu}'s {GPUS[args.gpu].bf16_tflops:g} TFLOP/s bf16 peak; measure with a short scan and pass --rate)"),
        f"time       {p['hours']:.1f} h on {p['replicas']} replicas ({p['gpu_hours']:.0f} GPU-hours)",
    ]
    return "\n".join(lines)


def adaptive_scan_text(p: dict, args: PlanSettings) -> str:
    """The adaptive scan's forwards, the exhaustive count beside them, and where the saving comes from."""
    f = p["forwards"]
    views = f"heads x D x {p['views']}{', measure_fig' if p['views'] == 3 else ''}"
    screen = (f" + screen {f['screen']:,} (D x {p['views']} views x a forward and a backward, about 3 forwards)"
              if "screen" in f else "")
    how = (f"--saving {p['adaptive_saving']:g}, as measured" if p["adaptive_saving_measured"] else
           f"{p['adaptive_saving']:.2f}x fewer: the saving that replays of the adaptive scan measured on a 320-head "
           f"ViT ({', '.join(f'{s:g}x at {n:,}' for n, s in REFERENCE_SAVINGS[args.adaptive_order])} images of D"
           f"{', order screen' if args.adaptive_order == 'screen' else ''}), interpolated at D = {p['images_in_d']:,}; "
           "it depends on how far the heads' scores sit below the K-th (a head g below it leaves after about "
           "14.5 / g images), so measure yours with `cigma-ray bench adaptive RUN` on an exhaustive run and pass "
           "--saving")
    return f"scan about {f['scan']:,} adaptive ({how}; exhaustive: {p['scan_exhaustive']:,} = {views}){screen}"
