"""`cigma-ray plan`: what a scan of a Hugging Face model will cost, from its config.json alone (no weights).

Parameters are counted from the hyper-parameters with the formulas below (tests hold them to the
exact count of models built from the same configs). Memory, throughput and time are estimates,
and every assumption is printed with them.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

OVERHEAD = 1.2  # memory beyond the weights: activations, the prefix key/value cache and its class copies, CUDA context
BYTES = {"fp32": 4, "bf16": 2}
UTILISATION = 0.3  # share of the peak FLOP rate an eager batched forward reaches (assumed, not measured)
PROMPT_TOKENS = 24  # prompt words around the class list (assumed)
CLASS_TOKENS = 3  # tokens per class name (assumed)


@dataclass(frozen=True)
class GPU:
    memory_gb: float
    bf16_tflops: float  # dense peak, from the vendor's data sheet


GPUS = {"h100": GPU(80, 989), "h200": GPU(141, 989), "a100-80": GPU(80, 312), "a100-40": GPU(40, 312),
        "l40s": GPU(48, 362), "a10g": GPU(24, 125)}


# -- parameters -----------------------------------------------------------------------------------
def size2(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def clip_vision_params(v) -> int:
    """CLIP's vision tower: class token, patch conv (no bias), positions, pre/post norms, L encoder layers
    of q, k, v, out (D x D + D each), two LayerNorms and a D -> I -> D MLP."""
    d, i = v.hidden_size, v.intermediate_size
    p = size2(v.patch_size)[0]
    n = (size2(v.image_size)[0] // p) ** 2
    embeddings = d + 3 * p * p * d + (n + 1) * d
    layer = 4 * (d * d + d) + (d * i + i + i * d + d) + 4 * d
    return embeddings + 4 * d + v.num_hidden_layers * layer


def internvl_vision_params(v) -> int:
    """InternViT: class token (and mask token), patch conv with bias, positions; per layer q, k, v
    (bias optional), the output projection with bias, optional q/k norms, two norms, the MLP and two
    layer-scale vectors; a final LayerNorm unless it mean-pools."""
    d, i = v.hidden_size, v.intermediate_size
    ph, pw = size2(v.patch_size)
    h, w = size2(v.image_size)
    n = (h // ph) * (w // pw)
    embeddings = d * (2 if v.use_mask_token else 1) + 3 * ph * pw * d + d
    embeddings += (n + 1) * d if v.use_absolute_position_embeddings else 0
    norm = 2 * d if v.norm_type == "layer_norm" else d
    attention = 3 * (d * d + (d if v.attention_bias else 0)) + d * d + d + (2 * d if v.use_qk_norm else 0)
    layer = attention + (d * i + i + i * d + d) + 2 * norm + 2 * d
    return embeddings + v.num_hidden_layers * layer + (0 if v.use_mean_pooling else 2 * d)


def text_params(t, tied: bool) -> int:
    """A Llama-style decoder: embeddings V x D; per layer q (D x H*hd), k and v (D x KV*hd each), o
    (H*hd x D), biases where the architecture has them (Qwen2: q, k, v), a gated MLP (3 x D x I) and two
    RMSNorms; a final norm; the LM head V x D unless tied to the embeddings."""
    d, i, heads, kv = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads or t.num_attention_heads
    hd = getattr(t, "head_dim", None) or d // heads
    attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    if t.model_type.startswith("qwen2"):
        attention += heads * hd + 2 * kv * hd
    elif getattr(t, "attention_bias", False):
        attention += heads * hd + 2 * kv * hd + d
    mlp = 3 * d * i + ((2 * i + d) if getattr(t, "mlp_bias", False) else 0)
    return t.vocab_size * d * (1 if tied else 2) + t.num_hidden_layers * (attention + mlp + 2 * d) + d


def clip_text_params(t) -> int:
    d, i = t.hidden_size, t.intermediate_size
    layer = 4 * (d * d + d) + (d * i + i + i * d + d) + 4 * d
    return t.vocab_size * d + t.max_position_embeddings * d + t.num_hidden_layers * layer + 2 * d


def count_params(config) -> dict[str, int]:
    """{vision, projector, language, total} parameters of a CLIP, LLaVA, LLaVA-NeXT or InternVL config."""
    kind = config.model_type
    if kind == "clip":
        v, t = config.vision_config, config.text_config
        vision = clip_vision_params(v)
        language = clip_text_params(t)
        projector = (v.hidden_size + t.hidden_size) * config.projection_dim + 1  # both projections, logit scale
    elif kind in ("llava", "llava_next", "internvl"):
        v, t = config.vision_config, config.text_config
        vision = internvl_vision_params(v) if kind == "internvl" else clip_vision_params(v)
        tied = getattr(config, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False)
        language = text_params(t, tied)
        dt = t.hidden_size
        if kind == "internvl":
            width = v.hidden_size * int(1 / config.downsample_ratio) ** 2
            projector = 2 * width + width * dt + dt + dt * dt + dt
        else:
            layers = config.vision_feature_layer
            width = v.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
            bias = getattr(config, "multimodal_projector_bias", True)
            projector = width * dt + dt * dt + (2 * dt if bias else 0) + (dt if kind == "llava_next" else 0)
    else:
        raise ValueError(f"model_type {kind!r}: plan knows clip, llava, llava_next and internvl")
    return {"vision": vision, "projector": projector, "language": language, "total": vision + projector + language}


# -- the plan -------------------------------------------------------------------------------------
def heads_of(config, heads: str) -> int:
    if config.model_type == "clip" or heads == "vision":
        v = config.vision_config
        return v.num_hidden_layers * v.num_attention_heads
    t = config.text_config
    return heads_of(config, "vision") + t.num_hidden_layers * t.num_attention_heads


def tokens_per_forward(config, classes: int) -> tuple[int, int]:
    """(vision tokens, language-model tokens) of one image's forward: tiles x (patches + class token); the
    image tokens, the prompt and every class's answer tokens."""
    v = config.vision_config
    p = size2(v.patch_size)
    h, w = size2(v.image_size)
    patches = (h // p[0]) * (w // p[1])
    if config.model_type == "clip":
        return patches + 1, 0
    tiles = 1
    if config.model_type == "llava_next":
        side = max(a for a, b in config.image_grid_pinpoints if a == b)
        tiles = 1 + (side // h) ** 2
    image = tiles * patches if config.model_type != "internvl" else config.image_seq_length + 2
    return tiles * (patches + 1), image + PROMPT_TOKENS + CLASS_TOKENS * classes * 2  # listed, then scored


def make_plan(config, *, precision: str = "bf16", gpu: str = "h100", gpus_per_node: int = 8, nodes: int = 1,
              images: int = 10_000, accuracy: float = 1.0, tp_ratio: float = 0.4, mask_steps: int = 250,
              heads: str = "vision", classes: int = 10, rate: float | None = None, measure_fig: bool = True) -> dict:
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
    views = 3 if measure_fig else 2  # the image and its background-removed counterfactual, and foreground-removed
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


def read_config(path: str):
    """AutoConfig from a model directory or a config.json file; nothing else is read."""
    from transformers import AutoConfig

    from .models import ModelError

    path = path.removeprefix("hf:")
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--model {path}: no config.json there; plan reads only a model's config (a directory or "
                         "its config.json; `hf download ID config.json --local-dir DIR` fetches just that)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def format_plan(name: str, p: dict, args: argparse.Namespace) -> str:
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
        f"scan {f['scan']:,} (heads x D x {p['views']}{', measure_fig' if p['views'] == 3 else ''}) = {total:,}",
        f"rate       {p['rate']:.1f} forwards/s per replica ({p['rate'] / p['views']:.1f} head x image pairs/s) "
        + ("(measured, --rate)" if p["rate_measured"] else
           f"(estimate: {p['flops_per_forward'] / 1e12:.2f} TFLOP per forward at {UTILISATION:.0%} of the "
           f"{args.gpu}'s {GPUS[args.gpu].bf16_tflops:g} TFLOP/s bf16 peak; measure with a short scan and pass --rate)"),
        f"time       {p['hours']:.1f} h on {p['replicas']} replicas ({p['gpu_hours']:.0f} GPU-hours)",
    ]
    return "\n".join(lines)


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory, placement, forwards and time of a scan, from a model's config.json only")
    p.add_argument("--model", required=True, help="hf:DIR or a config.json path (no weights needed)")
    p.add_argument("--precision", default="bf16", choices=sorted(BYTES))
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU type (default h100)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--images", type=int, default=10_000, help="images in the data set (default 10000)")
    p.add_argument("--accuracy", type=float, default=1.0, help="expected share classified correctly (default 1.0)")
    p.add_argument("--config", help="the scan's YAML config file: tp_ratio, mask_steps and measure_fig come from it")
    p.add_argument("--tp-ratio", type=float, help="config key tp_ratio (default: the config's, 0.4)")
    p.add_argument("--mask-steps", type=int, help="config key mask_steps (default: the config's, 250)")
    p.add_argument("--heads", default="vision", choices=["vision", "vision+text"])
    p.add_argument("--classes", type=int, default=10, help="number of classes (prompt and scoring length; default 10)")
    p.add_argument("--rate", type=float, help="measured whole-model forwards per second per replica")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import ConfigError

    from .config import load

    cfg = load(args.config)
    args.tp_ratio = cfg.tp_ratio if args.tp_ratio is None else args.tp_ratio
    args.mask_steps = cfg.mask_steps if args.mask_steps is None else args.mask_steps
    config = read_config(args.model)
    try:
        plan = make_plan(config, precision=args.precision, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
                         nodes=args.nodes, images=args.images, accuracy=args.accuracy, tp_ratio=args.tp_ratio,
                         mask_steps=args.mask_steps, heads=args.heads, classes=args.classes, rate=args.rate,
                         measure_fig=cfg.measure_fig)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(format_plan(args.model, plan, args))
    return 0
