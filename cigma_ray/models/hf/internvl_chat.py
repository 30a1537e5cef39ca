"""InternVL2 and InternVL2.5 as published (`model_type: internvl_chat`), loaded without their code.

The published checkpoints (InternVL2-26B, InternVL2.5-26B, ...) ship Python files that
`trust_remote_code` would run: InternViT, an InternLM2 (or Qwen2, Llama) language model, and
`InternVLChatModel`. cigma-ray never runs them. It maps the published weights, at load time, onto
transformers' own InternVL classes (`InternVLForConditionalGeneration`), which compute the same
function:

- InternViT -> `InternVLVisionModel`: the fused `attn.qkv` is split into q, k, v (thirds); q/k
  RMSNorms over all heads together, RMSNorm or LayerNorm blocks, layer scale (`ls1`, `ls2` ->
  `lambda_1`, `lambda_2`), no final norm (`use_mean_pooling`, whose pooler is never read);
- `mlp1` (LayerNorm, Linear, GELU, Linear) -> the multi-modal projector; pixel shuffle `ps_version`
  v2 (v1 transposes the feature map and is refused); `select_layer` -> `vision_feature_layer`,
  the class token dropped as `InternVLChatModel.extract_feature` does;
- InternLM2 -> `LlamaForCausalLM`: `wqkv` holds, per key/value group, the group's query heads,
  then its key, then its value head; it is split per group into q, k, v; `wo`, `w1`/`w3`/`w2`,
  the RMSNorms and `output` are renamed; rope theta and scaling (dynamic NTK, linear) carry over.
  Qwen2 and Llama language models are transformers' own classes already and are only renamed.

Why not run the published code: under transformers 5 it loads and returns NaN logits without
an error (its rotary buffers are never initialised), its generation fails in four places, it keeps
key/value caches as tuples (the class scoring here needs transformers' Cache), and it would run
files from the model directory on every replica of a cluster. The tests hold the logits computed
here equal to the published code's forward (a shimmed copy, as the oracle) on the same inputs.

The prompt is built as the model's own `chat()` builds it: its conversation template
(`template` in config.json) with the system message, the question after `<image>\n`, and
`<image>` replaced by `<img>` + n x `<IMG_CONTEXT>` + `</img>`, tokenized with the tokenizer's
own special tokens (BOS). Each image is one square tile at the tower's size (448 px for the 26B
models), n = 256 for it: that is what `chat()`'s dynamic tiling makes of a square image up to
633 px (a 1x1 grid, and no thumbnail, which is only added to grids of two or more tiles); the
image is first resized on its shorter side and centre-cropped to a square, as for every hf model.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..base import ModelError, ModelSpec
from .common import device_plan
from .vlm import ARCHITECTURES, VLMAdapter, VLMClassifier, class_token_ids, question_of, weights_dtype
from .weights import checkpoint_entries, materialize, read_tensors, rebuild_rotary_buffers

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # InternVL's build_transform
LANGUAGE_MODELS = ("InternLM2ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")

# The published class defaults (configuration_intern_vit.py, configuration_internlm2.py,
# configuration_internvl_chat.py), used where config.json leaves a key out.
VISION_DEFAULTS = dict(num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                       num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                       hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, initializer_factor=0.1)
INTERNLM2_DEFAULTS = dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                          max_position_embeddings=2048, rms_norm_eps=1e-6, bias=True, rope_theta=10000,
                          rope_scaling=None, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CHAT_DEFAULTS = dict(use_backbone_lora=0, use_llm_lora=0, select_layer=-1, force_image_size=None,
                     downsample_ratio=0.5, template=None, ps_version="v1")


@dataclass(frozen=True)
class Template:
    """A conversation template of InternVL's conversation.py in its MPT separator style:
    system_template(system) + sep + user + question + sep + assistant."""

    system: str
    user: str
    assistant: str
    sep: str
    system_template: str = "<|im_start|>system\n{system_message}"

    def prompt(self, question: str, system: str | None = None) -> str:
        head = self.system_template.format(system_message=self.system if system is None else system)
        return head + self.sep + self.user + question + self.sep + self.assistant


_SYSTEM_V2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_SYSTEM_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
TEMPLATES = {
    "internlm2-chat": Template(_SYSTEM_V2, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "Hermes-2": Template(_SYSTEM_V2, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "internvl2_5": Template(_SYSTEM_V25, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
}


# -- config -----------------------------------------------------------------------------------------
def read_chat_config(path: str) -> dict:
    """config.json of an internvl_chat directory as published (no code runs), the class defaults filled in."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    return with_defaults(raw)


def with_defaults(raw: dict) -> dict:
    cfg = {**CHAT_DEFAULTS, **raw}
    cfg["vision_config"] = {**VISION_DEFAULTS, **raw.get("vision_config", {})}
    llm = dict(raw.get("llm_config") or {})
    if (llm.get("architectures") or [""])[0] == "InternLM2ForCausalLM":
        llm = {**INTERNLM2_DEFAULTS, **llm}
    cfg["llm_config"] = llm
    return cfg


def check_chat_config(cfg: dict, name: str) -> None:
    """Refuse, by name, what the mapping onto transformers' classes would not compute exactly."""
    arch = (cfg["llm_config"].get("architectures") or [""])[0]
    problems = []
    if arch not in LANGUAGE_MODELS:
        problems.append(f"llm_config.architectures is {arch!r}; cigma-ray maps {', '.join(LANGUAGE_MODELS)}")
    if cfg["ps_version"] != "v2":
        problems.append(f"ps_version is {cfg['ps_version']!r}; only 'v2' (InternVL2 and later) is mapped")
    if cfg["use_backbone_lora"] or cfg["use_llm_lora"]:
        problems.append("the checkpoint holds LoRA adapters (use_backbone_lora/use_llm_lora); merge them first")
    v = cfg["vision_config"]
    size = cfg["force_image_size"] or v["image_size"]
    if size != v["image_size"]:
        problems.append(f"force_image_size {size} differs from vision_config.image_size {v['image_size']}")
    grid = size // v["patch_size"]
    ratio = cfg["downsample_ratio"]
    if grid * ratio != int(grid * ratio) or (1 / ratio) != int(1 / ratio):
        problems.append(f"downsample_ratio {ratio} does not divide the {grid}x{grid} patch grid")
    if not -v["num_hidden_layers"] - 1 <= cfg["select_layer"] < v["num_hidden_layers"] + 1:
        problems.append(f"select_layer {cfg['select_layer']} is outside the vision tower's layers")
    if cfg["template"] not in TEMPLATES:
        problems.append(f"template {cfg['template']!r}; cigma-ray knows {', '.join(TEMPLATES)}")
    if problems:
        raise ModelError(f"--model {name}: this internvl_chat checkpoint cannot be loaded exactly: " + "; ".join(problems))


def num_image_tokens(cfg: dict) -> int:
    """IMG_CONTEXT tokens per tile, as InternVLChatModel.num_image_token: (size / patch)^2 x ratio^2."""
    v = cfg["vision_config"]
    size = cfg["force_image_size"] or v["image_size"]
    return int((size // v["patch_size"]) ** 2 * (cfg["downsample_ratio"] ** 2))


def text_config(cfg: dict):
    """The language model's transformers config: InternLM2's as a Llama config; Qwen2's and Llama's as they are."""
    from transformers import LlamaConfig, Qwen2Config

    t = {k: v for k, v in cfg["llm_config"].items() if k not in ("architectures", "auto_map", "torch_dtype",
                                                                 "attn_implementation", "_name_or_path")}
    arch = cfg["llm_config"]["architectures"][0]
    if arch == "Qwen2ForCausalLM":
        return Qwen2Config(**{**t, "tie_word_embeddings": False})  # InternVLChatConfig unties the head always
    if arch == "LlamaForCausalLM":
        return LlamaConfig(**{**t, "tie_word_embeddings": False})
    heads = t["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(t["rope_theta"])}
    if t.get("rope_scaling"):
        kind = t["rope_scaling"].get("type") or t["rope_scaling"].get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise ModelError(f"llm_config.rope_scaling type {kind!r}: InternLM2 knows 'dynamic' and 'linear'")
        rope = {**rope, "rope_type": kind, "factor": float(t["rope_scaling"]["factor"])}
    return LlamaConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                       num_hidden_layers=t["num_hidden_layers"], num_attention_heads=heads,
                       num_key_value_heads=t["num_key_value_heads"] or heads, head_dim=t["hidden_size"] // heads,
                       hidden_act=t["hidden_act"], max_position_embeddings=t["max_position_embeddings"],
                       rms_norm_eps=t["rms_norm_eps"], attention_bias=bool(t["bias"]), mlp_bias=False,
                       rope_parameters=rope, tie_word_embeddings=False, pad_token_id=t.get("pad_token_id"),
                       bos_token_id=t.get("bos_token_id"), eos_token_id=t.get("eos_token_id"))


def native_config(cfg: dict, image_token_id: int = 0):
    """transformers' InternVLConfig computing what the published internvl_chat model computes."""
    from transformers import InternVLConfig, InternVLVisionConfig

    v = cfg["vision_config"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], hidden_act=v["hidden_act"], norm_type=v["norm_type"],
        layer_norm_eps=v["layer_norm_eps"], image_size=v["image_size"], patch_size=v["patch_size"],
        num_channels=v["num_channels"], attention_bias=bool(v["qkv_bias"]), use_qk_norm=bool(v["qk_normalization"]),
        use_mean_pooling=True, use_mask_token=False, use_absolute_position_embeddings=True,
        layer_scale_init_value=v["initializer_factor"])
    return InternVLConfig(vision_config=vision, text_config=text_config(cfg), image_token_id=image_token_id,
                          image_seq_length=num_image_tokens(cfg), downsample_ratio=cfg["downsample_ratio"],
                          projector_hidden_act="gelu", vision_feature_layer=cfg["select_layer"],
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


# -- weights ----------------------------------------------------------------------------------------
VISION_RENAMES = [
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.q_norm\.", r"model.vision_tower.encoder.layer.\1.attention.q_norm."),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.k_norm\.", r"model.vision_tower.encoder.layer.\1.attention.k_norm."),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"mlp1\.3\.", "model.multi_modal_projector.linear_2."),
]
INTERNLM2_RENAMES = [
    (r"language_model\.model\.tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.", r"model.language_model.layers.\1.self_attn.o_proj."),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.", r"model.language_model.layers.\1.mlp.gate_proj."),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.", r"model.language_model.layers.\1.mlp.up_proj."),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.", r"model.language_model.layers.\1.mlp.down_proj."),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.", r"model.language_model.layers.\1.input_layernorm."),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.", r"model.language_model.layers.\1.post_attention_layernorm."),
    (r"language_model\.model\.norm\.", "model.language_model.norm."),
    (r"language_model\.output\.", "lm_head."),
]
HF_LM_RENAMES = [(r"language_model\.model\.", "model.language_model."), (r"language_model\.lm_head\.", "lm_head.")]
VISION_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
LM_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")


def weight_converter(cfg: dict):
    """convert(published name, tensor) -> [(transformers name, tensor view)] for weights.materialize."""
    llm = cfg["llm_config"]
    internlm2 = llm["architectures"][0] == "InternLM2ForCausalLM"
    renames = [(re.compile(p), r) for p, r in VISION_RENAMES + (INTERNLM2_RENAMES if internlm2 else HF_LM_RENAMES)]
    if internlm2:
        heads = llm["num_attention_heads"]
        kv = llm["num_key_value_heads"] or heads
        head_dim = llm["hidden_size"] // heads

    def convert(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        m = VISION_QKV.fullmatch(name)
        if m:  # rows: all heads' q, then k, then v
            q, k, v = t.chunk(3, dim=0)
            base = f"model.vision_tower.encoder.layer.{m[1]}.attention"
            return [(f"{base}.{p}_proj.{m[2]}", x) for p, x in zip("qkv", (q, k, v))]
        m = LM_WQKV.fullmatch(name) if internlm2 else None
        if m:  # rows: per key/value group, its query heads, its key head, its value head
            grouped = t.reshape(kv, heads // kv + 2, head_dim, *t.shape[1:])
            base = f"model.language_model.layers.{m[1]}.self_attn"
            return [(f"{base}.q_proj.{m[2]}", grouped[:, :-2]), (f"{base}.k_proj.{m[2]}", grouped[:, -2]),
                    (f"{base}.v_proj.{m[2]}", grouped[:, -1])]
        for pattern, replacement in renames:
            if pattern.match(name):
                return [(pattern.sub(replacement, name, count=1), t)]
        return []

    return convert


# -- tokenizer, prompt, transform -------------------------------------------------------------------
def load_tokenizer(path: str, name: str):
    """The checkpoint's tokenizer from its tokenizer.json (no tokenizer code runs)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ModelError(
            f"--model {name}: the directory has no tokenizer.json. InternVL's InternLM2 tokenizer is Python code in the "
            "checkpoint, which cigma-ray does not run; write its fast form once where that code may run: "
            "`python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('DIR', trust_remote_code=True)"
            ".save_pretrained('DIR')\"`")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model {name}: cannot read its tokenizer.json ({e})") from None
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in tokenizer.get_vocab()]
    if missing:
        raise ModelError(f"--model {name}: its tokenizer has no {', '.join(missing)} token(s); is it the checkpoint's own?")
    return tokenizer


def chat_prompt(cfg: dict, question: str, tiles: int = 1) -> str:
    """The text InternVLChatModel.chat() tokenizes for one image of `tiles` tiles and a question."""
    template = TEMPLATES[cfg["template"]]
    if "<image>" not in question:
        question = "<image>\n" + question
    text = template.prompt(question, cfg.get("system_message"))
    return text.replace("<image>", IMG_START + IMG_CONTEXT * num_image_tokens(cfg) * tiles + IMG_END, 1)


def image_transform(size: int):
    """PIL image -> (3, size, size): shorter side to `size` (bicubic), centre crop, ImageNet normalisation
    (InternVL's build_transform for one tile; a square image is resized exactly as it does)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Lambda(lambda im: im.convert("RGB")),
                               transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# -- loading ----------------------------------------------------------------------------------------
def build_native(cfg: dict, path: str, name: str, image_token_id: int, device_map: dict | None, dtype: torch.dtype):
    """InternVLForConditionalGeneration with the published weights, each tensor read once and copied to
    its device in `dtype`; device_map None builds the structure only, on the meta device."""
    from transformers import InternVLForConditionalGeneration

    config = native_config(cfg, image_token_id)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    if device_map is None:
        return model.eval()
    for layer in model.model.vision_tower.encoder.layer:  # InternViT's q/k norms use the config's eps
        for norm in (layer.attention.q_norm, layer.attention.k_norm):
            if hasattr(norm, "variance_epsilon"):
                norm.variance_epsilon = cfg["vision_config"]["layer_norm_eps"]
    entries = checkpoint_entries(path)
    materialize(model, read_tensors(entries), weight_converter(cfg), device_map, dtype, f"--model {name}")
    rebuild_rotary_buffers(model, device_map)
    return model.eval()


def split_device_map(model: nn.Module, max_memory: dict) -> dict:
    """Where each module of a meta-device model goes on several GPUs (accelerate's balanced map)."""
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules or [])


def load_internvl_chat(spec: ModelSpec, path: str, device, precision: str = "fp32"):
    question = question_of(spec)
    cfg = read_chat_config(path)
    check_chat_config(cfg, spec.name)
    tokenizer = load_tokenizer(path, spec.name)
    size = int(cfg["force_image_size"] or cfg["vision_config"]["image_size"])
    text = chat_prompt(cfg, question.format(classes=", ".join(spec.classes)))
    prefix_ids = tokenizer(text, return_tensors="pt")["input_ids"]  # as chat(): the tokenizer's own BOS
    class_ids = class_token_ids(tokenizer, spec.classes, spec.scoring)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    device = torch.device(device)
    dtype = weights_dtype(precision, device)
    arch = ARCHITECTURES["internvl"]

    if device.type == "meta":  # the structure only (a Ray driver): no weights are read
        vlm = build_native(cfg, path, spec.name, image_token_id, None, dtype)
        return VLMAdapter(VLMClassifier(vlm, arch, prefix_ids, class_ids, spec.scoring), spec.heads, (size, size),
                          placed=False), image_transform(size)
    memory = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    placement = device_plan(device, memory)
    if placement is None:
        device_map = {"": device}
    else:
        device_map = split_device_map(build_native(cfg, path, spec.name, image_token_id, None, dtype),
                                      placement["max_memory"])
    vlm = build_native(cfg, path, spec.name, image_token_id, device_map, dtype)
    if placement is not None:
        from accelerate import dispatch_model

        vlm = dispatch_model(vlm, device_map=device_map)
    first = torch.device("cuda:0") if placement is not None else device
    model = VLMClassifier(vlm, arch, prefix_ids, class_ids, spec.scoring).to(first)  # the buffers go with the inputs
    return VLMAdapter(model, spec.heads, (size, size), placed=True), image_transform(size)
