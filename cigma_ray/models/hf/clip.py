"""CLIP as a zero-shot classifier: logits = logit_scale * cos(image embedding, class embedding).

Each class's embedding is the normalised mean of its normalised text embeddings over the prompt
templates (CLIP's prompt ensembling), computed once at load; the text tower is then dropped.
The heads are the vision tower's; the prefix-shared scan works on it as on a timm ViT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ModelError, ModelSpec
from .common import HFAdapter, find_heads, image_transform

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class CLIPZeroShot(nn.Module):
    """The vision half of a CLIPModel plus fixed class embeddings: images -> (B, classes) logits."""

    def __init__(self, clip: nn.Module, class_embeds: torch.Tensor):
        super().__init__()
        self.vision = clip.vision_model
        self.projection = clip.visual_projection
        self.logit_scale = clip.logit_scale
        self.register_buffer("class_embeds", class_embeds)

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's tokens (class token -> post-norm -> projection -> cosine)."""
        image = F.normalize(self.projection(self.vision.post_layernorm(tokens[:, 0])), dim=-1)
        return self.logit_scale.exp() * image @ self.class_embeds.to(image.dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.vision(pixel_values=x).last_hidden_state)


class CLIPAdapter(HFAdapter):
    supports_prefix = True

    def __init__(self, model: CLIPZeroShot, input_size: tuple[int, int]):
        super().__init__(model, {"vision": find_heads(model.vision.encoder)}, input_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision
        return vision.pre_layrnorm(vision.embeddings(x))

    def block(self, layer: int, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        with self.gates.use({layer: keep} if keep is not None else {}):
            return self.model.vision.encoder.layers[layer](tokens, None)

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.readout(tokens)

    @property
    def layer_labels(self) -> list[str]:
        return [f"vision.{i}" for i in range(self.num_layers)]


def check_templates(templates: tuple[str, ...]) -> None:
    for t in templates:
        if "{}" not in t:
            raise ModelError(f"--prompt {t!r}: a CLIP prompt template needs {{}} where the class name goes "
                             "(e.g. 'a photo of a {}.')")


@torch.inference_mode()
def class_embeddings(clip: nn.Module, tokenizer, classes: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
    """(classes, dim): per class, the normalised mean over templates of the normalised text embeddings."""
    out = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
        text = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text = getattr(text, "pooler_output", text)
        out.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=0))
    return torch.stack(out)


def load_clip(spec: ModelSpec, path: str, device, precision: str = "fp32") -> tuple[CLIPAdapter, object]:
    from transformers import AutoTokenizer, CLIPModel

    if spec.heads != "vision":
        raise ModelError(f"--heads {spec.heads}: a CLIP classifier's heads are its vision tower's; use --heads vision")
    templates = spec.prompts or DEFAULT_TEMPLATES
    check_templates(templates)
    clip = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model {spec.name}: cannot read its tokenizer ({e}); save it with the model") from None
    embeds = class_embeddings(clip, tokenizer, spec.classes, templates).clone()  # a normal tensor: masks backpropagate
    model = CLIPZeroShot(clip, embeds)
    size = clip.config.vision_config.image_size
    return CLIPAdapter(model, (size, size)), image_transform(path, (size, size))
