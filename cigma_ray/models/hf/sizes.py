"""A Hugging Face model's size from its config alone (no weights): parameters per part, attention
heads, tokens per forward. Formulas are held by tests to the exact counts of models built from the
same configs."""
from __future__ import annotations

import os

from ..base import ModelError

PROMPT_TOKENS = 24  # prompt words around the class list (assumed)
CLASS_TOKENS = 3  # tokens per class name (assumed)


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


def read_config(path: str):
    """AutoConfig from a model directory or a config.json file; nothing else is read."""
    from transformers import AutoConfig

    path = path.removeprefix("hf:")
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--model {path}: no config.json there; plan reads only a model's config (a directory or "
                         "its config.json; `hf download ID config.json --local-dir DIR` fetches just that)")
    return AutoConfig.from_pretrained(path, local_files_only=True)
