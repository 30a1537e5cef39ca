"""What a scan of a Hugging Face model will cost (`cigma-ray plan`), from its config.json alone: memory
per stage and the micro-batches that fit, placement, host memory, forwards and time. Memory, throughput
and time are estimates (memory: engine/memory.py), and every assumption is printed with them
(reports/plan.py)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .engine.memory import RESERVE, estimate_memory, host_bytes, micro_batches
from .method.adaptive import expected_saving
from .models.hf.sizes import count_params, heads_of, read_vision_layers, tokens_per_forward

GB = 1e9
UTILISATION = 0.3  # share of the peak FLOP rate an eager batched forward reaches (assumed, not measured)


@dataclass(frozen=True)
class GPU:
    memory_gb: float
    bf16_tflops: float  # dense peak, from the vendor's data sheet


GPUS = {"h100": GPU(80, 989), "h200": GPU(141, 989), "a100-80": GPU(80, 312), "a100-40": GPU(40, 312),
        "l40s": GPU(48, 362), "a10g": GPU(24, 125)}


def make_plan(config, *, precision: str = "bf16", gpu: str = "h100", gpus_per_node: int = 8, nodes: int = 1,
              images: int = 10_000, accuracy: float = 1.0, tp_ratio: float = 0.4, mask_steps: int = 250,
              heads: str = "vision", classes: int = 10, rate: float | None = None, measure_fig: bool = True,
              mask_batch: int = 64, mask_micro_batch: int = 0, batch_size: int = 64, measure_swap: bool = False,
              adaptive: bool = False, adaptive_order: str = "none", adaptive_saving: float | None = None) -> dict:
    """Every number `cigma-ray plan` prints, as a dict (tests check them). With `adaptive`, the scan's forwards
    are the exhaustive count divided by the expected saving (`method.adaptive.expected_saving` at this D, or
    `adaptive_saving` as measured by `cigma-ray bench adaptive` on a comparable run), plus the pre-screen's
    forward and backward (about 3 forwards) per view and image with adaptive_order screen."""
    params = count_params(config)
    card = GPUS[gpu]
    memory = replica_memory(config, params["total"], precision, card.memory_gb * GB, gpus_per_node, classes,
                            mask_batch, mask_micro_batch, batch_size, gpu)
    gpus_per_replica = memory["gpus"]
    replicas = nodes * (gpus_per_node // gpus_per_replica)
    d = max(1, round(images * accuracy * tp_ratio))
    n_heads = heads_of(config, heads)
    v = config.vision_config
    unread = 0 if config.model_type == "clip" else v.num_hidden_layers - read_vision_layers(config, v.num_hidden_layers)
    # the image and its background-removed counterfactual, and the foreground-removed and background-swapped ones
    views = 2 + int(measure_fig) + int(measure_swap)
    forwards = {"predict": images, "mask": d * (3 * mask_steps + 3), "scan": n_heads * d * views}
    exhaustive = forwards["scan"]
    saving = None
    if adaptive:
        saving = adaptive_saving if adaptive_saving is not None else expected_saving(d, adaptive_order)
        forwards["scan"] = math.ceil(exhaustive / saving)
        if adaptive_order == "screen":
            forwards["screen"] = 3 * views * d
    vision_tokens, text_tokens = tokens_per_forward(config, classes)
    flops = 2 * (params["vision"] * vision_tokens + (params["language"] + params["projector"]) * text_tokens)
    if rate is None:
        peak = card.bf16_tflops * 1e12 * gpus_per_replica * (1 if precision == "bf16" else 0.5)
        rate, measured = peak * UTILISATION / flops, False
    else:
        measured = True
    seconds = sum(forwards.values()) / (rate * replicas)
    return {"params": params, "memory": memory, "memory_gb": memory["peak"] / GB, "gpus_per_replica": gpus_per_replica,
            "replicas_per_node": gpus_per_node // gpus_per_replica, "replicas": replicas, "images_in_d": d,
            "heads": n_heads, "unread_layers": unread, "views": views, "forwards": forwards,
            "scan_exhaustive": exhaustive, "adaptive_saving": saving, "adaptive_saving_measured": adaptive_saving is not None,
            "flops_per_forward": flops, "rate": rate, "rate_measured": measured,
            "hours": seconds / 3600, "gpu_hours": seconds * replicas * gpus_per_replica / 3600}


def replica_memory(config, params: int, precision: str, device_bytes: float, max_gpus: int, classes: int = 10,
                   mask_batch: int = 64, mask_micro_batch: int = 0, batch_size: int = 64, gpu: str = "GPU") -> dict:
    """One replica's memory: the fewest GPUs of `device_bytes` that hold the weights and at least one image of
    the mask stage (or the config's mask_micro_batch) and of the scan, the micro-batches used there, bytes per
    stage on each GPU, and host bytes per replica (engine.memory's estimates).

    The mask stage runs `mask_micro_batch` images per forward and backward (0: the whole mask_batch); a run
    fixes it (a result key), so when the whole batch does not fit, `mask_suggested` is the value to set. The
    scan's batch is `batch_size` or as many image-forwards as fit, whichever is fewer (it never changes results).
    """
    est = estimate_memory(config, precision=precision, classes=classes, params=params)
    need = mask_micro_batch or 1
    for gpus in range(1, max_gpus + 1):
        fit = micro_batches(est, int(device_bytes), gpus)
        if fit["fits"] and fit["mask"] >= need:
            break
    else:
        raise ValueError(f"one replica needs more than the {max_gpus} {gpu} GPU(s) of a node: {est.weights / GB:.0f} GB of "
                         f"weights in {precision} and {need * est.mask_per_image / GB:.1f} GB for {need} image(s) of the "
                         "mask stage (estimates); use bigger GPUs or more per node (--gpus-per-node)")
    whole = min(mask_batch, fit["mask"]) == mask_batch
    mask = mask_micro_batch or (mask_batch if whole else min(mask_batch, fit["mask"]))
    scan = min(batch_size, fit["scan"])
    on_device = {"weights": est.weights / gpus, "mask": mask * est.mask_per_image, "scan": scan * est.scan_per_forward}
    return {"estimate": est.to_dict(), "gpus": gpus, "device_bytes": device_bytes, "usable": device_bytes * (1 - RESERVE),
            "fit": fit, "mask_micro_batch": mask, "mask_whole_batch": not mask_micro_batch and whole,
            "mask_suggested": None if mask_micro_batch or whole else mask, "scan_batch": scan,
            "on_device": on_device, "peak": est.weights + max(on_device["mask"], on_device["scan"]),
            "peak_per_gpu": on_device["weights"] + max(on_device["mask"], on_device["scan"]),
            "host": host_bytes(est, on_gpu=True)}


def host_memory(config, precision: str, on_gpu: bool = True, params: int | None = None) -> int:
    """Host bytes of one replica (engine.memory.host_bytes): its process and the loading buffer, plus the
    weights when the replica runs on CPUs."""
    est = estimate_memory(config, precision=precision, params=count_params(config)["total"] if params is None else params)
    return host_bytes(est, on_gpu=on_gpu)


@dataclass(frozen=True)
class PlanSettings:
    """What `cigma-ray plan` is asked: the model, the hardware, the data and the scan's config keys."""

    model: str
    precision: str = "bf16"
    gpu: str = "h100"
    gpus_per_node: int = 8
    nodes: int = 1
    images: int = 10_000
    accuracy: float = 1.0
    tp_ratio: float = 0.4
    mask_steps: int = 250
    heads: str = "vision"
    classes: int = 10
    rate: float | None = None
    measure_fig: bool = True
    mask_batch: int = 64
    mask_micro_batch: int = 0
    batch_size: int = 64
    measure_swap: bool = False
    adaptive: bool = False
    adaptive_order: str = "none"
    adaptive_saving: float | None = None

    def plan(self, config) -> dict:
        """make_plan for these settings on a model's config."""
        return make_plan(config, **{k: v for k, v in asdict(self).items() if k != "model"})
