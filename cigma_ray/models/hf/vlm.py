"""Vision-language models (LLaVA, LLaVA-NeXT, InternVL) as classifiers over a fixed class list.

The prompt asks which of the classes the image shows. The image and prompt (the prefix) run once
per image with the key/value cache on; then every class's answer tokens run together in one
forward against that one cache (a block-causal mask: each class's tokens see the prefix and their
own class's earlier tokens), and a class's logit is the log-probability of its answer:

- scoring "sequence" (default): the sum of its tokens' log-probabilities, log p(t1..tn | prefix).
  Summed log-probabilities favour short names, as likelihoods do; one-token classes need no
  second forward at all (the next-token distribution of the prefix gives every logit).
- scoring "first": the log-probability of its first token only (no second forward), allowed only
  when every class starts with a different token; it asks "which answer does the model begin".

The heads are `vision.L` (the vision encoder, the default) and with `--heads vision+text` also
`text.L` (the language model). The keep-mask acts on the vision encoder exactly as for timm, and
so does prefix sharing of the vision layers below an ablated head (VLMAdapter); the language
model runs for every ablation.

Adding another architecture: give its config.json `model_type` an Architecture below, with the
transformers class, where its vision encoder and language model are (the heads inside are found
by `hf.find_heads`), how a batch of preprocessed images becomes its pixel inputs, and the
processor arguments that make one tile per image. Then a tiny-config test as in tests/test_models_hf.py.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..base import ModelError, ModelSpec
from .common import HFAdapter, device_plan, find_heads, image_transform, read_vision_layers

DEFAULT_PROMPT = "Which of these is in the image: {classes}? Answer with one of them."
SCORINGS = ("sequence", "first")
LOGIT_ROWS = 256  # answer tokens per slice of the vocabulary projection in class scoring


def plain_pixels(model: nn.Module, x: torch.Tensor) -> dict:
    return {"pixel_values": x}


def anyres_pixels(model: nn.Module, x: torch.Tensor) -> dict:
    """LLaVA-NeXT's "anyres" input for square images at a grid resolution: the whole image at the
    tower's size, then its tiles row by row (what its processor makes of an image of that size)."""
    tile = model.config.vision_config.image_size
    base = F.interpolate(x, size=(tile, tile), mode="bicubic", antialias=True, align_corners=False)
    b, c, h, w = x.shape
    tiles = x.unfold(2, tile, tile).unfold(3, tile, tile).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c, tile, tile)
    sizes = torch.tensor([[h, w]], device=x.device).expand(b, 2)
    return {"pixel_values": torch.cat([base[:, None], tiles], dim=1), "image_sizes": sizes}


def tower_size(config) -> int:
    size = config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def anyres_size(config) -> int:
    """The largest square grid resolution LLaVA-NeXT knows: square images are tiled at it."""
    squares = [h for h, w in config.image_grid_pinpoints if h == w]
    if not squares:
        raise ModelError("this LLaVA-NeXT config has no square image_grid_pinpoints; cigma-ray scans square images")
    return max(squares)


@dataclass(frozen=True)
class Architecture:
    model_class: str  # transformers class name
    vision: Callable[[nn.Module], nn.Module]  # the vision encoder inside the loaded model
    text: Callable[[nn.Module], nn.Module]  # the language model
    pixels: Callable[[nn.Module, torch.Tensor], dict] = plain_pixels
    input_size: Callable[[object], int] = tower_size
    processor_kwargs: dict = field(default_factory=dict)


ARCHITECTURES = {
    "llava": Architecture("LlavaForConditionalGeneration", lambda m: m.model.vision_tower, lambda m: m.model.language_model),
    "llava_next": Architecture("LlavaNextForConditionalGeneration", lambda m: m.model.vision_tower,
                               lambda m: m.model.language_model, anyres_pixels, anyres_size),
    "internvl": Architecture("InternVLForConditionalGeneration", lambda m: m.model.vision_tower,
                             lambda m: m.model.language_model, processor_kwargs={"crop_to_patches": False}),
}


class VLMClassifier(nn.Module):
    """A generative VLM with a fixed prompt and class list: images -> (B, classes) log-probabilities."""

    def __init__(self, vlm: nn.Module, arch: Architecture, prefix_ids: torch.Tensor, class_ids: list[list[int]],
                 scoring: str):
        super().__init__()
        self.vlm = vlm
        self.arch = arch
        self.scoring = scoring
        self.register_buffer("prefix_ids", prefix_ids, persistent=False)  # (1, T)
        longest = max(len(ids) for ids in class_ids)
        self.register_buffer("class_ids", torch.tensor([ids + [ids[-1]] * (longest - len(ids)) for ids in class_ids]),
                             persistent=False)  # (C, longest), padded by repeating the last token (never scored)
        self.register_buffer("class_mask", torch.tensor([[j < len(ids) for j in range(longest)] for ids in class_ids]),
                             persistent=False)
        params = inspect.signature(vlm.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed within transformers 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        longer = self.scoring == "sequence" and self.class_ids.shape[1] > 1
        out = self.vlm(input_ids=self.prefix_ids.expand(b, -1), **self.arch.pixels(self.vlm, x), use_cache=longer,
                       logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, vocab): the answer's first token
        scores = first[:, self.class_ids[:, 0]]
        if not longer:
            return scores
        cache = getattr(out, "cache", None) or out.past_key_values
        return scores + self.continuations(cache, b)

    def continuations(self, cache, b: int) -> torch.Tensor:
        """(B, C): sum over each class's tokens 2..n of log p(t_j | prefix, t_1..t_j-1).

        Every class's answer tokens go through one forward after the one cached copy of the
        image+prompt prefix: each token attends to the prefix and to its own class's earlier
        tokens (a block-causal mask), at the positions it would have after the prefix alone. So
        memory grows with the classes' answer tokens, never with copies of the prefix's cache;
        rows are images, so the heads' keep-masks apply as they are. The vocabulary projection
        runs in slices of LOGIT_ROWS answer tokens.
        """
        n_classes, longest = self.class_ids.shape
        device = self.class_ids.device
        prefix = cache.get_seq_length()
        real = self.class_mask[:, 1:]  # input token j of class c is needed iff its target j+1 exists
        owner = torch.arange(n_classes, device=device)[:, None].expand(-1, longest - 1)[real]
        step = torch.arange(longest - 1, device=device)[None].expand(n_classes, -1)[real]
        inputs, targets = self.class_ids[:, :-1][real], self.class_ids[:, 1:][real]
        n = len(inputs)
        own = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])
        allowed = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), own], dim=1)
        if getattr(self.vlm.config.get_text_config(), "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        else:
            mask = allowed
        out = self.vlm.model(input_ids=inputs.expand(b, -1), attention_mask=mask[None, None].expand(b, 1, -1, -1),
                             position_ids=(prefix + step).expand(b, -1), **{self.cache_arg: cache}, use_cache=True)
        hidden = out.last_hidden_state
        logp = torch.cat([self.vlm.lm_head(hidden[:, s: s + LOGIT_ROWS]).float().log_softmax(-1)
                          .gather(-1, targets[s: s + LOGIT_ROWS].expand(b, -1)[..., None])[..., 0]
                          for s in range(0, n, LOGIT_ROWS)], dim=1)  # (B, n)
        return torch.zeros(b, n_classes, device=logp.device, dtype=logp.dtype).index_add(1, owner.to(logp.device), logp)


class VLMAdapter(HFAdapter):
    """Heads of the vision encoder, and of the language model with vision+text.

    Scanning the vision encoder's heads alone, the layers below an ablated head are shared as for
    timm (`supports_prefix`): `embed` and `block` run the vision layers themselves, and `finish`
    runs the whole model with the vision layers below the last one standing in for their result
    (they return the given tokens without computing), so the language model still runs for every
    ablated forward. That needs one tile per image and a model that reads only its last two vision
    layers (LLaVA's default -2, InternVL's -1); otherwise every forward is the whole model.
    """

    def __init__(self, model: VLMClassifier, heads: str, input_size: tuple[int, int], placed: bool):
        vision = model.arch.vision(model.vlm)
        layers = {"vision": find_heads(vision)}
        if heads == "vision+text":
            layers["text"] = find_heads(model.arch.text(model.vlm))
        if not all(layers.values()):
            raise ModelError(f"no attention heads found in the {[k for k, v in layers.items() if not v]} part of "
                             f"{type(model.vlm).__name__}; add its names to hf.OUTPUT_PROJECTIONS")
        super().__init__(model, layers, input_size)
        self.placed = placed
        self.vision = vision
        self.layers = vision_layers(vision, [proj for proj, _ in layers["vision"]])
        self.supports_prefix = (heads == "vision" and model.arch.pixels is plain_pixels and self.layers is not None
                                and reads_last_layers_only(model.vlm.config, len(self.layers)))
        if self.supports_prefix:  # a vision layer's required arguments after its input, e.g. CLIP's attention_mask
            params = list(inspect.signature(self.layers[0].forward).parameters.values())[1:]
            self.layer_nones = [None] * sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                            for p in params)

    @property
    def skipped_layers(self) -> dict[int, str]:
        """The vision layers above the one the language model reads (LLaVA reads the second-to-last)."""
        n = len(self.layers) if self.layers is not None else len(find_heads(self.vision))
        read = getattr(self.model.vlm.config, "vision_feature_layer", -1)
        top = read_vision_layers(self.model.vlm.config, n)
        why = (f"vision_feature_layer {read}: the language model reads the vision tower's hidden state after its "
               f"layer {top - 1}, so the heads of the layers above it cannot change the logits")
        return {layer: why for layer in range(top, n)}

    def memory_profile(self) -> dict:
        """engine.memory.estimate_memory's arguments for this classifier: its config, parameters, and the real
        token counts of its prefix (the image's tokens and the question) and of its classes' answers."""
        classes = self.model.class_ids.shape[0]
        return {"config": self.model.vlm.config, "classes": classes,
                "class_tokens": max(1, round(int(self.model.class_mask.sum()) / classes)),  # per class, on average
                "prefix_tokens": int(self.model.prefix_ids.shape[1]),
                "params": sum(p.numel() for p in self.model.parameters())}

    def head_output_sums(self, x: torch.Tensor):
        """Sums of the heads' outputs over the images and the tokens of the prompt's forward (the image's and
        the question's, once per image): the language model's heads also run on the answers' tokens, but those
        depend on the class list and on how it is chunked, so they are left out of the means."""
        with self.gates.record() as sums:
            handle = self.model.vlm.register_forward_hook(lambda *args: sums.paused.update(range(self.num_layers)))
            try:
                self.model(x)
            finally:
                handle.remove()
        return sums

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the first vision layer: the tower's embeddings (and any norm before its layers)."""
        captured = []
        with stand_ins(self.layers, lambda t: captured.append(t) or t):  # the layers compute nothing
            self.vision(pixel_values=x)
        return captured[0]

    def block(self, layer: int, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        with self.gates.use({layer: keep} if keep is not None else {}):
            return self.layers[layer](tokens, *self.layer_nones)

    def finish(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The class scores from the input of the last vision layer: the layers below it stand in for it."""
        last = self.num_layers - 1
        x = torch.zeros(len(tokens), 3, *self.input_size, device=tokens.device, dtype=tokens.dtype)
        with stand_ins(self.layers[:last], lambda t: tokens), self.gates.use({last: keep} if keep is not None else {}):
            return self.model(x)


def vision_layers(vision: nn.Module, projections: list[nn.Linear]) -> nn.ModuleList | None:
    """The vision encoder's list of layers: the ModuleList whose i-th element holds the i-th head projection."""
    for module in vision.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(projections) and all(
                any(m is proj for m in layer.modules()) for layer, proj in zip(module, projections)):
            return module
    return None


def reads_last_layers_only(config, n_layers: int) -> bool:
    """Whether the language model reads only the vision hidden states of the last two layers."""
    read = getattr(config, "vision_feature_layer", -1)
    read = read if isinstance(read, (list, tuple)) else [read]
    return all((i if i >= 0 else n_layers + 1 + i) >= n_layers - 1 for i in read)


@contextlib.contextmanager
def stand_ins(layers, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, each of `layers` returns fn(its input) instead of computing (hooks still see it)."""
    layers = list(layers)
    previous = [layer.__dict__.get("forward") for layer in layers]  # e.g. the forward accelerate's hooks install
    for layer in layers:
        layer.forward = lambda hidden_states, *args, **kwargs: fn(hidden_states)
    try:
        yield
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def prefix_text(processor, question: str) -> str:
    """The prompt as the model expects it: its chat template when it has one, else image, newline, question."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{processor.image_token}\n{question}\n"


def class_token_ids(tokenizer, classes: tuple[str, ...], scoring: str) -> list[list[int]]:
    ids = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in classes]
    empty = [c for c, i in zip(classes, ids) if not i]
    if empty:
        raise ModelError(f"--classes: {empty[:5]} tokenize to nothing")
    if scoring == "first":
        firsts = {}
        for name, i in zip(classes, ids):
            if i[0] in firsts:
                raise ModelError(f"scoring 'first' needs every class to start with its own token, but {firsts[i[0]]!r} "
                                 f"and {name!r} both start with {tokenizer.convert_ids_to_tokens(i[0])!r}; "
                                 "use scoring 'sequence' or rename the classes")
            firsts[i[0]] = name
    return ids


def question_of(spec: ModelSpec) -> str:
    """The VLM question of a spec (checked), with {classes} still in it."""
    if spec.scoring not in SCORINGS:
        raise ModelError(f"--scoring {spec.scoring!r}: use one of {', '.join(SCORINGS)}")
    if len(spec.prompts) > 1:
        raise ModelError("a vision-language model takes one --prompt (the question, with {classes})")
    question = spec.prompts[0] if spec.prompts else DEFAULT_PROMPT
    if "{classes}" not in question:
        raise ModelError(f"--prompt {question!r}: the question must list the classes with {{classes}}, e.g. {DEFAULT_PROMPT!r}")
    return question


def weights_dtype(precision: str, device) -> torch.dtype:
    """The weights in bf16 only for a bf16 run on a GPU; fp32 runs (the exact ones) keep fp32 weights."""
    return torch.bfloat16 if precision == "bf16" and torch.device(device).type == "cuda" else torch.float32


def without_leading_bos(text: str, tokenizer) -> str:
    """A chat template that writes BOS itself, tokenized by a tokenizer that adds BOS, would give two."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text


def place_buffers(model: VLMClassifier, device) -> None:
    """The prompt and class buffers go where the inputs go."""
    for name in ("prefix_ids", "class_ids", "class_mask"):
        setattr(model, name, getattr(model, name).to(device))


def load_vlm(spec: ModelSpec, path: str, device, precision: str = "fp32") -> tuple[VLMAdapter, object]:
    import transformers
    from transformers import AutoConfig, AutoProcessor

    question = question_of(spec)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    arch = ARCHITECTURES[config.model_type]
    size = arch.input_size(config)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model {spec.name}: cannot read its processor ({e}); save it with the model "
                         "(processor.save_pretrained(DIR))") from None
    text = without_leading_bos(prefix_text(processor, question.format(classes=", ".join(spec.classes))), processor.tokenizer)
    dummy = Image.new("RGB", (size, size))
    prefix_ids = processor(text=text, images=dummy, return_tensors="pt", **arch.processor_kwargs)["input_ids"]
    class_ids = class_token_ids(processor.tokenizer, spec.classes, spec.scoring)

    model_class = getattr(transformers, arch.model_class)
    device = torch.device(device)
    if device.type == "meta":  # the structure only (a Ray driver): no weights are read
        with torch.device("meta"):
            vlm = model_class._from_config(config)
        return VLMAdapter(VLMClassifier(vlm.eval(), arch, prefix_ids, class_ids, spec.scoring), spec.heads,
                          (size, size), placed=False), image_transform(path, (size, size))
    placement = device_plan(device, [torch.cuda.get_device_properties(i).total_memory
                                     for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    # straight to the device in the run's dtype: one GPU gets the whole model, several a split one
    vlm = model_class.from_pretrained(path, local_files_only=True, dtype=weights_dtype(precision, device),
                                      **(placement or {"device_map": {"": device}}))
    model = VLMClassifier(vlm.eval(), arch, prefix_ids, class_ids, spec.scoring)
    place_buffers(model, "cuda:0" if placement is not None else device)
    return VLMAdapter(model, spec.heads, (size, size), placed=True), image_transform(path, (size, size))
