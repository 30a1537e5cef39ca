"""`cigma-ray plan`'s output: parameters, memory per stage with the micro-batches that fit, placement, host
memory, forwards, rate and time, with their assumptions."""
from __future__ import annotations

from ..engine.memory import HOST_PROCESS, RESERVE
from ..method.adaptive import REFERENCE_SAVINGS
from ..plan import GB, GPUS, UTILISATION, PlanSettings
from .tables import format_table


def memory_lines(p: dict, args: PlanSettings) -> list[str]:
    """The memory table of one replica: weights, the mask stage, the scan and class scoring, then host memory."""
    m = p["memory"]
    est = m["estimate"]
    gpus = m["gpus"]
    on = m["on_device"]
    per_gpu = "" if gpus == 1 else " per GPU"
    images = f"{m['mask_micro_batch']} image{'s' if m['mask_micro_batch'] > 1 else ''}"
    if m["mask_whole_batch"]:
        mask_batch = f"{images} at once (mask_batch)"
    elif m["mask_suggested"]:
        mask_batch = f"{images} per forward+backward"
    else:
        mask_batch = f"{images} per forward+backward (mask_micro_batch)"
    scan_batch = f"{m['scan_batch']} image-forwards (batch_size {args.batch_size}; {m['fit']['scan']} would fit)"
    tokens = est["tokens"]
    rows = [
        ["weights", f"{p['params']['total'] / 1e9:.2f} B parameters x {2 if est['precision'] == 'bf16' else 4} bytes",
         f"split over {gpus} GPUs" if gpus > 1 else "", f"{on['weights'] / GB:.1f} GB{per_gpu}"],
        ["mask stage", f"{est['mask_per_image'] / GB:.2f} GB per image (kept for the backward)", mask_batch,
         f"{on['mask'] / GB:.1f} GB"],
        ["scan", f"{est['scan_per_forward'] / GB:.3f} GB per image-forward", scan_batch, f"{on['scan'] / GB:.1f} GB"],
        ["class scoring", f"{est['scoring_per_image'] / GB:.3f} GB per image, in both stages",
         f"{tokens['answers']} answer tokens after one {tokens['text']}-token prefix" if tokens["answers"]
         else "no answer tokens after the prefix", ""],
        ["peak", "weights + the larger stage", "", f"{m['peak_per_gpu'] / GB:.1f} of {m['usable'] / GB:.1f} GB usable"
         f"{per_gpu}"],
    ]
    lines = [f"memory     per replica in {args.precision} on {gpus} x {args.gpu} ({GPUS[args.gpu].memory_gb:g} GB each, "
             f"{RESERVE:.0%} kept free); estimates for SDPA attention (flash attention keeps less):"]
    lines += ["  " + line for line in format_table(["stage", "size", "micro-batch", "on the GPU"], rows, "llll").splitlines()]
    if m["mask_suggested"]:
        lines.append(f"  mask_batch {args.mask_batch} does not fit at once: put `mask_micro_batch: {m['mask_suggested']}` "
                     "in the scan's config (a run fixes it: it changes the masks by float rounding)")
    host = m["host"]
    lines.append(f"host       {host / GB:.1f} GB per replica ({HOST_PROCESS / GB:.1f} GB for the process, "
                 f"{est['host_loading'] / GB:.1f} GB loading buffer: the weights go straight to the GPUs, one tensor at "
                 f"a time), {host * p['replicas_per_node'] / GB:.1f} GB per {args.gpus_per_node}-GPU node")
    return lines


def plan_text(name: str, p: dict, args: PlanSettings) -> str:
    b = 1e9
    prm = p["params"]
    f = p["forwards"]
    total = sum(f.values())
    lines = [
        f"model      {name}",
        f"parameters {prm['total'] / b:.2f} B  (vision {prm['vision'] / b:.2f} B, projector {prm['projector'] / b:.3f} B, "
        f"language {prm['language'] / b:.2f} B)",
        *memory_lines(p, args),
        f"placement  {p['gpus_per_replica']} x {args.gpu} ({GPUS[args.gpu].memory_gb:g} GB) per replica "
        f"(--gpus-per-replica {p['gpus_per_replica']}), {p['replicas_per_node']} replicas per {args.gpus_per_node}-GPU node, "
        f"{p['replicas']} on {args.nodes} node(s)",
        f"images     {args.images} predicted; D = {p['images_in_d']} (accuracy {args.accuracy:g} x tp_ratio {args.tp_ratio:g})",
        f"heads      {p['heads']} scanned ({args.heads}"
        + (f"; the heads of the {p['unread_layers']} vision layer(s) above the one the language model reads are not"
           if p["unread_layers"] else "") + "); the language model runs in full for every ablated forward",
        f"forwards   predict {f['predict']:,} + mask {f['mask']:,} (D x (3 x {args.mask_steps} steps + 3)) + "
        + (f"scan {f['scan']:,} (heads x D x {p['views']}{view_names(args)})"
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
    views = f"heads x D x {p['views']}{view_names(args)}"
    screen = (f" + screen {f['screen']:,} (D x {p['views']} views x a forward and a backward, about 3 forwards)"
              if "screen" in f else "")
    how = (f"--saving {p['adaptive_saving']:g}, as measured" if p["adaptive_saving_measured"] else
           f"{p['adaptive_saving']:.2f}x fewer: the saving that replays of the adaptive scan measured on a 320-head "
           f"ViT ({', '.join(f'{s:g}x at {n:,}' for n, s in REFERENCE_SAVINGS[args.adaptive_order])} images of D"
           f"{', order screen' if args.adaptive_order == 'screen' else ''}), interpolated at D = {p['images_in_d']:,}; "
           "it depends on how far the heads' scores sit below the K-th and on how BIG spreads over D, so measure "
           "yours with `cigma-ray bench adaptive RUN` on an exhaustive run and pass --saving")
    return f"scan about {f['scan']:,} adaptive ({how}; exhaustive: {p['scan_exhaustive']:,} = {views}){screen}"


def view_names(args: PlanSettings) -> str:
    """The scan's extra views beside the image and its background-removed counterfactual, as config keys."""
    return "".join(", " + k for k in ("measure_fig", "measure_swap") if getattr(args, k, False))
