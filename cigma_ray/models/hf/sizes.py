"""A Hugging Face model's size from its config alone (no weights): the config read without running
any code (`read_config`, the published InternVL2 format included), parameters per part, attention
heads, tokens per forward. Formulas are held by tests to the exact counts of models built from the
same configs."""
from __future__ import annotations

import json
import os

from ..base import ModelError
from .common import read_vision_layers

PROMPT_TOKENS = 24  # prompt tokens around the class list (assumed)
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
    """Heads a scan measures: the vision tower's (but those of layers the language model never reads), and the
    language model's with `vision+text`."""
    v = config.vision_config
    if config.model_type == "clip":
        return v.num_hidden_layers * v.num_attention_heads
    vision = read_vision_layers(config, v.num_hidden_layers) * v.num_attention_heads
    if heads == "vision":
        return vision
    t = config.text_config
    return vision + t.num_hidden_layers * t.num_attention_heads


def vision_tokens(config) -> tuple[int, int]:
    """(tiles per image, tokens per tile including the class token) of the vision tower: one tile per
    square image, LLaVA-NeXT's base image plus its grid tiles at the largest square resolution."""
    v = config.vision_config
    p = size2(v.patch_size)
    h, w = size2(v.image_size)
    per_tile = (h // p[0]) * (w // p[1]) + 1
    tiles = 1
    if config.model_type == "llava_next":
        side = max(a for a, b in config.image_grid_pinpoints if a == b)
        tiles = 1 + (side // h) ** 2
    return tiles, per_tile


def image_tokens(config) -> int:
    """Tokens the language model reads for one image (InternVL: image_seq_length per tile; LLaVA's default
    strategy drops the class token)."""
    tiles, per_tile = vision_tokens(config)
    if config.model_type == "internvl":
        return config.image_seq_length * tiles
    return tiles * (per_tile - 1)


def tokens_per_forward(config, classes: int) -> tuple[int, int]:
    """(vision tokens, language-model tokens) of one image's forward: tiles x (patches + class token); the
    image tokens, the prompt and every class's answer tokens."""
    tiles, per_tile = vision_tokens(config)
    if config.model_type == "clip":
        return per_tile, 0
    image = image_tokens(config) + (2 if config.model_type == "internvl" else 0)  # <img> ... </img>
    return tiles * per_tile, image + PROMPT_TOKENS + CLASS_TOKENS * classes * 2  # listed, then scored


def config_dir(path: str) -> str:
    """The directory holding config.json, for `hf:DIR`, DIR or DIR/config.json."""
    path = path.removeprefix("hf:")
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--model {path}: no config.json there; plan reads only a model's config (a directory or "
                         "its config.json; `hf download ID config.json --local-dir DIR` fetches just that)")
    return path


def read_raw_config(path: str) -> dict:
    """config.json of `hf:DIR`, DIR or DIR/config.json as plain JSON."""
    with open(os.path.join(config_dir(path), "config.json")) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ModelError(f"--model {path}: config.json is not valid JSON ({e})") from None


def read_config(path: str):
    """A transformers config for the model at `path` (a directory or its config.json), without running any
    code from it or prompting: for the published InternVL2 format (`internvl_chat`) the InternVLConfig that
    cigma-ray maps it onto (internvl_chat.native_config), for every other type the class transformers
    registers for it. `trust_remote_code` is never asked for; nothing but config.json is read."""
    from transformers import CONFIG_MAPPING

    raw = read_raw_config(path)
    kind = raw.get("model_type", "")
    if kind == "internvl_chat":
        from .internvl_chat import native_config, with_defaults

        return native_config(with_defaults(raw))
    if kind not in CONFIG_MAPPING:
        raise ModelError(f"--model {path}: config.json has model_type {kind!r}, which this transformers does not know "
                         "(cigma-ray never runs a model's own code)")
    return CONFIG_MAPPING[kind].from_dict({k: v for k, v in raw.items() if k != "auto_map"})


def internvl_chat_params(raw: dict) -> dict[str, int]:
    """{vision, projector, language, total} parameters of a published internvl_chat config.

    InternViT: class token, patch conv with bias, (patches + 1) positions; per layer the fused qkv
    (3 D x D, bias optional), the output projection with bias, q/k RMSNorms (D each) when
    qk_normalization, two norms (RMSNorm D, LayerNorm 2 D), two layer-scale vectors, fc1/fc2 with
    biases; no final norm. mlp1: LayerNorm(W), W -> Dt, Dt -> Dt with biases, W = D / ratio^2.
    InternLM2: tok_embeddings, per layer wqkv (D x (H + 2 KV) hd), wo (H hd x D), biases when
    `bias`, w1/w3/w2, two RMSNorms; a final norm; `output` (never tied by InternVLChatConfig).
    Qwen2 and Llama language models (transformers' classes) are counted on a meta-device model.
    Counted from the published config's own keys, independently of the mapping onto transformers'
    classes (tests hold the two equal).
    """
    from .internvl_chat import text_config, with_defaults

    cfg = with_defaults(raw)
    v = cfg["vision_config"]
    d, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n = (v["image_size"] // p) ** 2
    norm = d if v["norm_type"] == "rms_norm" else 2 * d
    attention = 3 * d * d + (3 * d if v["qkv_bias"] else 0) + d * d + d + (2 * d if v["qk_normalization"] else 0)
    layer = attention + 2 * norm + 2 * d + (d * i + i + i * d + d)
    vision = d + 3 * p * p * d + d + (n + 1) * d + v["num_hidden_layers"] * layer

    t = cfg["llm_config"]
    dt = t["hidden_size"]
    width = d * int(1 / cfg["downsample_ratio"]) ** 2
    projector = 2 * width + width * dt + dt + dt * dt + dt
    if t["architectures"][0] == "InternLM2ForCausalLM":
        heads = t["num_attention_heads"]
        kv, hd = t["num_key_value_heads"] or heads, dt // heads
        bias = bool(t["bias"])
        attention = dt * (heads + 2 * kv) * hd + ((heads + 2 * kv) * hd if bias else 0) + heads * hd * dt + (dt if bias else 0)
        block = attention + 3 * dt * t["intermediate_size"] + 2 * dt
        language = 2 * t["vocab_size"] * dt + t["num_hidden_layers"] * block + dt
    else:  # transformers' own classes: counted exactly on a model built on the meta device
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            language = sum(p.numel() for p in AutoModelForCausalLM.from_config(text_config(cfg)).parameters())
    return {"vision": vision, "projector": projector, "language": language, "total": vision + projector + language}
