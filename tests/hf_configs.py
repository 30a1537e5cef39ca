"""The real hyper-parameters of the paper's models, as config.json files (no weights): what `plan`, the
parameter counts and the memory estimates are tested on, and what the README's plan output was made from.

- InternVL2-26B as published (`internvl_chat`): InternViT-6B-448px-V1-5 (hidden 3200, 45 layers, 25 heads,
  MLP 12800, 448 px, patch 14, q/k RMSNorm, no qkv bias) + MLP projector + internlm2-chat-20b (hidden 6144,
  48 layers, 48 heads, 8 KV heads, MLP 16384, vocabulary 92553); 25.5 B parameters published.
- the same in transformers' InternVL format (what `hf:` maps the published one onto);
- LLaVA-1.5-13B as llava-hf publishes it: CLIP ViT-L/14 at 336 px, a two-layer projector, Llama-2-13B
  (vocabulary 32064 with the image and pad tokens); 13.35 B parameters published.
"""
from __future__ import annotations

import json
import os

INTERNVL2_26B = {
    "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "auto_map": {"AutoConfig": "x.Y"},
    "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2", "select_layer": -1, "template": "internlm2-chat",
    "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12,
    "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25,
                      "intermediate_size": 12800, "image_size": 448, "patch_size": 14, "qk_normalization": True,
                      "norm_type": "rms_norm", "qkv_bias": False},
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 6144,
                   "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8, "intermediate_size": 16384,
                   "vocab_size": 92553, "bias": False, "max_position_embeddings": 32768, "rope_theta": 1000000,
                   "rope_scaling": {"type": "dynamic", "factor": 2.0}},
}


def internvl2_26b(path: str) -> str:
    """A directory holding InternVL2-26B's config.json as published (internvl_chat)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(INTERNVL2_26B, f, indent=1)
    return path


def internvl2_26b_hf(path: str) -> str:
    """InternVL2-26B's hyper-parameters in transformers' InternVL format (InternLM2-20B written as a Llama)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    InternVLConfig(vision_config=InternVLVisionConfig(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                                                      intermediate_size=12800, image_size=448, patch_size=14,
                                                      use_qk_norm=True, norm_type="rms_norm"),
                   text_config=LlamaConfig(hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                                           num_key_value_heads=8, intermediate_size=16384, vocab_size=92553,
                                           tie_word_embeddings=False),
                   downsample_ratio=0.5, image_seq_length=256, tie_word_embeddings=False).save_pretrained(path)
    return path


def llava15_13b_config():
    """llava-hf/llava-1.5-13b-hf's hyper-parameters as a LlavaConfig."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_token_id=32000)


def llava15_13b(path: str) -> str:
    """A directory holding LLaVA-1.5-13B's config.json (llava-hf's format)."""
    llava15_13b_config().save_pretrained(path)
    return path
