"""Memory of each stage of a scan on one replica, estimated from a model's config alone.

`estimate_memory(config, ...)` -> MemoryEstimate (bytes):
- weights: the parameters in the run's precision (on the device; split over a replica's GPUs);
- mask_per_image: what one image adds in the mask stage, whose forward keeps activations for the
  backward to the input: per layer and token, about 8 D + I values in a ViT and 6 D + 3 I in a
  gated (Llama-style) decoder, plus heads x tokens for eager attention (coefficients measured with
  saved-tensor hooks on transformers 5.24, CPU, SDPA; tests/test_engine_memory.py holds the estimate to
  the measurement), plus the key/value cache the scoring keeps;
- scan_per_forward: what one image-forward of the scan adds (no autograd): the language model's
  key/value cache of the image+prompt prefix, and the largest layer's transient activations;
- scoring_per_image: the part of both that class scoring adds: every class's answer tokens after
  the one cached prefix (models/hf/vlm.py: VLMClassifier.continuations), their cache and their logits slices;
- host_loading: host memory to load (the largest checkpoint tensor, read once into one buffer,
  plus the weights themselves for a CPU replica), beside the process's own HOST_PROCESS bytes.

`micro_batches(estimate, device_bytes, gpus=1)` -> {"mask": images per forward+backward,
"scan": image-forwards per batch, "free": bytes left for activations, "fits": bool}: the
largest micro-batches that fit beside the weights with RESERVE of the device kept free.

Estimates, not measurements: GPU kernels (flash attention) keep less than eager attention; the
numbers assume the SDPA path, bf16 activations for a bf16 run. Token counts and parameters come from
models/hf/sizes.py (the config alone).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..models.hf.sizes import CLASS_TOKENS, PROMPT_TOKENS, count_params, image_tokens, vision_tokens

BYTES = {"fp32": 4, "bf16": 2}
RESERVE = 0.1  # share of each device kept free (CUDA context, allocator fragmentation)
HOST_PROCESS = 4 << 30  # a replica process's own host memory (Python, torch, CUDA libraries): assumed
LOGIT_ROWS = 256  # answer tokens per slice of the vocabulary projection (models/hf/vlm.py: LOGIT_ROWS)
VIT_SAVED = (8, 1)  # values kept for the backward per token and layer: (x D, x I), ViT blocks
DECODER_SAVED = (6, 3)  # the same for gated decoders (Llama, Qwen2, InternLM2)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    mask_per_image: int
    scan_per_forward: int
    scoring_per_image: int
    host_loading: int
    precision: str
    tokens: dict  # {"vision": per image (all tiles), "text": prefix tokens, "answers": answer tokens scored}

    def to_dict(self) -> dict:
        return asdict(self)


def kv_cache_bytes(t, tokens: int, nbytes: int) -> int:
    """Key/value cache of a decoder for `tokens` tokens of one sequence."""
    heads = t.num_attention_heads
    kv = getattr(t, "num_key_value_heads", None) or heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return 2 * t.num_hidden_layers * kv * head_dim * tokens * nbytes


def estimate_memory(config, *, precision: str = "bf16", classes: int = 10, class_tokens: int = CLASS_TOKENS,
                    prompt_tokens: int = PROMPT_TOKENS, params: int | None = None, eager_attention: bool = False,
                    checkpoint_bytes: int = 2, prefix_tokens: int | None = None) -> MemoryEstimate:
    """Bytes per stage for a CLIP, LLaVA, LLaVA-NeXT or InternVL config (models.hf.sizes.read_config's).
    `prefix_tokens` is the image+prompt prefix's length where it is known (a loaded classifier's); otherwise
    the image's tokens, `prompt_tokens` and the class list."""
    b = BYTES[precision]
    params = count_params(config)["total"] if params is None else params
    v = config.vision_config
    tiles, per_tile = vision_tokens(config)
    dv, iv, hv = v.hidden_size, v.intermediate_size, v.num_attention_heads
    attn_v = hv * per_tile * 4 if eager_attention else 0
    vision_saved = tiles * v.num_hidden_layers * per_tile * ((VIT_SAVED[0] * dv + VIT_SAVED[1] * iv) * b + attn_v)
    vision_peak = tiles * per_tile * ((4 * dv + 2 * iv) * b + attn_v)
    if config.model_type == "clip":
        largest = max(config.text_config.vocab_size, v.image_size) * config.text_config.hidden_size
        return MemoryEstimate(params * b, vision_saved, vision_peak, 0, largest * checkpoint_bytes, precision,
                              {"vision": tiles * per_tile, "text": 0, "answers": 0})
    t = config.get_text_config()
    dt, it, ht, vocab = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.vocab_size
    prefix = prefix_tokens or image_tokens(config) + prompt_tokens + classes * class_tokens  # the question lists them
    answers = classes * max(0, class_tokens - 1)
    per_token = (DECODER_SAVED[0] * dt + DECODER_SAVED[1] * it) * b
    attn_t = (lambda q, k: ht * q * k * 4) if eager_attention else (lambda q, k: 0)
    text_saved = t.num_hidden_layers * (prefix * per_token + attn_t(prefix, prefix)) + vocab * 4 * 2
    scoring_saved = t.num_hidden_layers * (answers * per_token + attn_t(answers, prefix + answers)) \
        + min(answers, LOGIT_ROWS) * vocab * 4 * 2 if answers else 0
    layer_peak = lambda n: n * (4 * dt + 3 * it) * b + attn_t(n, n)  # noqa: E731
    scan_text = kv_cache_bytes(t, prefix, b) + layer_peak(prefix) + vocab * 4 * 2
    scoring = (kv_cache_bytes(t, answers, b) + layer_peak(answers) + answers * (prefix + answers)
               + min(answers, LOGIT_ROWS) * vocab * 4 * 2) if answers else 0
    largest = max(vocab * dt, dt * (ht + 2 * (getattr(t, "num_key_value_heads", None) or ht)) * (dt // ht), dt * it)
    return MemoryEstimate(
        weights=params * b,
        mask_per_image=vision_saved + text_saved + scoring_saved,
        scan_per_forward=max(vision_peak, scan_text + scoring) + image_tokens(config) * dt * b,
        scoring_per_image=scoring,
        host_loading=largest * checkpoint_bytes,
        precision=precision,
        tokens={"vision": tiles * per_tile, "text": prefix, "answers": answers})


def micro_batches(estimate: MemoryEstimate, device_bytes: int, gpus: int = 1, reserve: float = RESERVE) -> dict:
    """The largest mask micro-batch and scan batch that fit on a replica of `gpus` devices of `device_bytes`.

    Weights are assumed spread evenly; activations of a split model live on every device in turn,
    so the free memory of one device bounds them."""
    free = int(device_bytes * (1 - reserve) - estimate.weights / gpus)
    if free <= 0:
        return {"mask": 0, "scan": 0, "free": free, "fits": False}
    mask = free // max(1, estimate.mask_per_image)
    scan = free // max(1, estimate.scan_per_forward)
    return {"mask": int(mask), "scan": int(scan), "free": free, "fits": bool(mask >= 1 and scan >= 1)}


def replica_estimate(adapter, precision: str) -> MemoryEstimate | None:
    """The estimate for a loaded model (its adapter's memory_profile: the real prompt and answer lengths), or
    None for models small enough not to need one."""
    profile = adapter.memory_profile()
    if profile is None:
        return None
    config = profile.pop("config")
    return estimate_memory(config, precision=precision, **profile)


def scan_batch(batch_size: int, estimate: MemoryEstimate | None, device_bytes: int, gpus: int = 1) -> int:
    """The scan's images per forward on a device: `batch_size`, or fewer when the estimate says fewer fit
    (never below 1; the scan still halves it on an out-of-memory error). Never changes results."""
    if estimate is None:
        return batch_size
    return max(1, min(batch_size, micro_batches(estimate, device_bytes, gpus)["scan"]))


def host_bytes(estimate: MemoryEstimate, on_gpu: bool = True) -> int:
    """Host memory of one replica: its process, the loading buffer, and the weights when they live on the host."""
    return HOST_PROCESS + estimate.host_loading + (0 if on_gpu else estimate.weights)


def default_precision(model_name: str, device: str) -> str:
    """The run's precision when none is given: bf16 for a Hugging Face model on a GPU (a 26B VLM's fp32
    weights alone fill 104 GB, and bf16 is the precision these models are published and served in), fp32
    everywhere else (timm models, CPUs: the exact path)."""
    return "bf16" if model_name.startswith("hf:") and str(device).startswith("cuda") else "fp32"
