"""The adapter contract: a model as embed -> blocks -> readout, with addressable attention heads.

A head is ablated by a per-sample keep-mask on the heads' outputs just before the attention's
output projection. That equals zeroing the head's columns of W_O (and, for attentions without a
norm between heads and projection, its rows of W_Q, W_K, W_V), without ever copying weights.
With substitutes installed (`HeadGates.set_means`, config `ablation: mean`), an ablated head's
output becomes a fixed vector (its mean over the images of D) instead of zero: the same as zeroing
its columns of W_O and adding W_O[:, head] @ mean to the projection's bias.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built or scanned; the message names the model and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same model in any process (driver, actor, resume)."""

    name: str  # "timm:NAME"
    checkpoint: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    random_weights: bool = False
    seed: int = 0
    # Hugging Face models (`hf:PATH`): which heads are scanned, the class names and the prompts.
    heads: str = "vision"  # "vision" or "vision+text" (a vision-language model's language model too)
    classes: tuple[str, ...] = ()  # one name per model output, in label order (default: the data's classes)
    prompts: tuple[str, ...] = ()  # CLIP: templates with {}; a VLM: one question with {classes}
    scoring: str = "sequence"  # VLM class logit: "sequence" (summed log-probs) or "first" (first token's)

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0] if ":" in self.name else ""

    @property
    def arch(self) -> str:
        return self.name.split(":", 1)[1] if ":" in self.name else self.name


class HeadGates:
    """Forward pre-hooks on each attention's output projection that apply the active keep-masks.

    Each layer is a timm-style attention module (`.proj`, `.num_heads`) or, for models that name
    things otherwise (Hugging Face's `out_proj`, `o_proj`), an (output projection, heads) pair.
    """

    def __init__(self, attentions: list[nn.Module | tuple[nn.Linear, int]]):
        found = [attention_projection(a) if isinstance(a, nn.Module) else head_projection(*a) for a in attentions]
        self.projections = [proj for proj, _, _ in found]
        self.heads_per_layer = [heads for _, heads, _ in found]
        self.head_dims = [dim for _, _, dim in found]
        self.active: list[torch.Tensor | None] = [None] * len(found)
        self.means: list[torch.Tensor | None] = [None] * len(found)  # per layer (heads x head_dim,): substitutes
        self.sums: HeadSums | None = None  # while `record` runs: the sums of the projections' inputs
        for layer, (proj, _, _) in enumerate(found):
            proj.register_forward_pre_hook(self._hook(layer))

    def _hook(self, layer: int):
        def apply(module: nn.Linear, args: tuple) -> tuple | None:
            if self.sums is not None:
                self.sums.add(layer, args[0])
            keep = self.active[layer]
            if keep is None:
                return None
            x = args[0]
            if x.shape[0] % keep.shape[0]:
                raise RuntimeError(f"keep-mask for layer {layer} has batch {keep.shape[0]}, activations have {x.shape[0]}")
            if x.shape[0] != keep.shape[0]:  # windows folded into the batch, image-major (timm's window_partition)
                keep = keep.repeat_interleave(x.shape[0] // keep.shape[0], dim=0)
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (keep.shape[1],)
            # a model split over devices runs each layer on its own one: the mask goes where the activations are
            keep = keep.to(device=x.device, dtype=x.dtype, non_blocking=True).view(shape)
            mean = self.means[layer]
            if mean is not None:  # ablated heads take their substitute: x * keep + (1 - keep) * mean
                return (x * keep + (1 - keep) * mean.to(device=x.device, dtype=x.dtype),) + args[1:]
            return (x * keep,) + args[1:]
        return apply

    def set_means(self, means: list[torch.Tensor | None] | None) -> None:
        """Substitutes for ablated heads, per layer a (heads x head_dim,) vector (the heads' outputs side
        by side, as the projection reads them), or None for zero ablation; None clears them all."""
        means = means if means is not None else [None] * len(self.projections)
        if len(means) != len(self.projections):
            raise ValueError(f"{len(means)} layers of means for {len(self.projections)} layers of heads")
        out = []
        for layer, (mean, proj) in enumerate(zip(means, self.projections)):
            if mean is not None:
                mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
                if mean.numel() != proj.in_features:
                    raise ValueError(f"layer {layer}: a mean of {mean.numel()} values for a projection of "
                                     f"{proj.in_features} inputs")
                if proj.weight.device.type != "meta":
                    mean = mean.to(proj.weight.device)
            out.append(mean)
        self.means = out

    @contextlib.contextmanager
    def record(self) -> Iterator["HeadSums"]:
        """Within the block, every forward adds its projections' inputs (all rows: images and tokens) to the
        yielded sums, in float64 (what the mean of each head's output over images and tokens needs)."""
        previous, self.sums = self.sums, HeadSums(self.projections)
        try:
            yield self.sums
        finally:
            self.sums = previous

    @contextlib.contextmanager
    def use(self, keep: dict[int, torch.Tensor]) -> Iterator[None]:
        """Activate keep-masks {layer: (B, heads)} (1 keeps a head, 0 ablates it) for the block."""
        previous = list(self.active)
        try:
            for layer, k in keep.items():
                dim = self.head_dims[layer]
                self.active[layer] = k.repeat_interleave(dim, dim=1)
            yield
        finally:
            self.active = previous


def scanned_heads(heads_per_layer: list[int], skipped=()) -> list[tuple[int, int]]:
    """The (layer, head) pairs a scan measures: every head but those of the `skipped` layers."""
    skipped = set(skipped)
    return [(layer, h) for layer, n in enumerate(heads_per_layer) if layer not in skipped for h in range(n)]


class HeadSums:
    """Per layer, the float64 sum of the output projection's inputs over every row it saw, and the row count.
    `paused` layers add nothing (a vision-language model's language model while it scores the answers)."""

    def __init__(self, projections: list[nn.Linear]):
        self.sums = [torch.zeros(p.in_features, dtype=torch.float64) for p in projections]
        self.counts = [0] * len(projections)
        self.paused: set[int] = set()

    def add(self, layer: int, x: torch.Tensor) -> None:
        if layer in self.paused:
            return
        rows = x.detach().reshape(-1, x.shape[-1])
        self.sums[layer] += rows.sum(dim=0, dtype=torch.float64).cpu()
        self.counts[layer] += rows.shape[0]


class HeadAdapter:
    """Base of all adapters. Subclasses set `model`, `gates` and `input_size` (H, W)."""

    model: nn.Module
    gates: HeadGates
    input_size: tuple[int, int]
    supports_prefix: bool = False

    @property
    def heads_per_layer(self) -> list[int]:
        return self.gates.heads_per_layer

    @property
    def num_layers(self) -> int:
        return len(self.heads_per_layer)

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [(layer, h) for layer, n in enumerate(self.heads_per_layer) for h in range(n)]

    @property
    def layer_labels(self) -> list[str]:
        """How people name each scanned layer ("0", "1", ...; a VLM's "vision.0", "text.0", ...)."""
        return [str(layer) for layer in range(self.num_layers)]

    @property
    def skipped_layers(self) -> dict[int, str]:
        """Layers whose heads cannot change the logits, {layer: why}; they are not scanned."""
        return {}

    def memory_profile(self) -> dict | None:
        """What engine.memory needs to estimate this model's memory per stage (a transformers config and the
        prompt's token counts), or None where the model is small enough not to need it (timm, CLIP)."""
        return None

    @property
    def scanned_heads(self) -> list[tuple[int, int]]:
        """The heads a scan measures: every head but those of the skipped layers."""
        return scanned_heads(self.heads_per_layer, self.skipped_layers)

    def logits(self, x: torch.Tensor, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole model's logits, with optional keep-masks {layer: (B, heads)}."""
        with self.gates.use(keep or {}):
            return self.model(x)

    def head_output_sums(self, x: torch.Tensor) -> HeadSums:
        """The sums of every head's output (the output projections' inputs) over the images x and all
        their tokens, on the intact model: what mean ablation substitutes, once divided by the counts."""
        with self.gates.record() as sums:
            self.model(x)
        return sums

    # Prefix-shared path (supports_prefix adapters only).
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, layer: int, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the input of the last block; adapters may compute only the rows the readout uses."""
        return self.readout(self.block(self.num_layers - 1, tokens, keep))


def attention_projection(attn: nn.Module) -> tuple[nn.Linear, int, int]:
    """(output projection, number of heads, head width) of a timm-style attention module."""
    proj = getattr(attn, "proj", None)
    heads = getattr(attn, "num_heads", None)
    if not isinstance(proj, nn.Linear) or not isinstance(heads, int) or proj.in_features % heads:
        raise ModelError(f"attention module {type(attn).__name__} has no per-head output projection "
                         "(needs .num_heads and a .proj Linear whose input splits into heads)")
    return proj, heads, proj.in_features // heads


def head_projection(proj: nn.Linear, heads: int) -> tuple[nn.Linear, int, int]:
    """(output projection, number of heads, head width) of an explicitly given projection."""
    if not isinstance(proj, nn.Linear) or proj.in_features % heads:
        raise ModelError(f"{type(proj).__name__} with {getattr(proj, 'in_features', '?')} inputs cannot be split "
                         f"into {heads} heads")
    return proj, heads, proj.in_features // heads
