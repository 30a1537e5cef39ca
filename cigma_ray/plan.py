"""What a scan of a Hugging Face model will cost (`cigma-ray plan`), from its config.json alone: memory,
placement, forwards and time. Memory, throughput and time are estimates, and every assumption is
printed with them (reports/plan.py)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .models.hf.sizes import count_params, heads_of, tokens_per_forward

OVERHEAD = 1.2  # memory beyond the weights: activations, the prefix key/value cache and its class copies, CUDA context
BYTES = {"fp32": 4, "bf16": 2}
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
              measure_swap: bool = False) -> dict:
    """Every number `cigma-ray plan` prints, as a dict (tests check them)."""
    params = count_params(config)
    card = GPUS[gpu]
    memory_gb = params["total"] * BYTES[precision] * OVERHEAD / 1e9
    gpus_per_replica = max(1, math.ceil(memory_gb / card.memory_gb))
    if gpus_per_replica > gpus_per_node:
        raise ValueError(f"one replica needs {memory_gb:.0f} GB: more than {gpus_per_node} {gpu} GPUs of a node hold")
    replicas = nodes * (gpus_per_node // gpus_per_replica)
    d = max(1, round(images * accuracy * tp_ratio))
    n_heads = heads_of(config, heads)
    # the image and its background-removed counterfactual, and the foreground-removed and background-swapped ones
    views = 2 + int(measure_fig) + int(measure_swap)
    forwards = {"predict": images, "mask": d * (3 * mask_steps + 3), "scan": n_heads * d * views}
    vision_tokens, text_tokens = tokens_per_forward(config, classes)
    flops = 2 * (params["vision"] * vision_tokens + (params["language"] + params["projector"]) * text_tokens)
    if rate is None:
        peak = card.bf16_tflops * 1e12 * gpus_per_replica * (1 if precision == "bf16" else 0.5)
        rate, measured = peak * UTILISATION / flops, False
    else:
        measured = True
    seconds = sum(forwards.values()) / (rate * replicas)
    return {"params": params, "memory_gb": memory_gb, "gpus_per_replica": gpus_per_replica,
            "replicas_per_node": gpus_per_node // gpus_per_replica, "replicas": replicas, "images_in_d": d,
            "heads": n_heads, "views": views, "forwards": forwards, "flops_per_forward": flops, "rate": rate, "rate_measured": measured,
            "hours": seconds / 3600, "gpu_hours": seconds * replicas * gpus_per_replica / 3600}


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
    measure_swap: bool = False

    def plan(self, config) -> dict:
        """make_plan for these settings on a model's config."""
        return make_plan(config, **{k: v for k, v in asdict(self).items() if k != "model"})
