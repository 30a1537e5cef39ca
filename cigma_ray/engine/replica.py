"""One model replica: the batched work of every stage on one device, tensors in and out."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from ..config import Config
from ..method import bir, counterfactuals, foreground_cells, gains, js, optimise_masks, probs, swapped
from ..models import LoadedModel
from ..models.base import HeadSums
from .scan import Ablated, batched, scan_heads

PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")
log = logging.getLogger(__name__)


def halving_on_oom(run: Callable[[int], T], batch_size: int) -> tuple[T, int]:
    """run(batch_size), halving the batch size after each out-of-memory error; (result, size that fit).

    Safe for the forward passes and the scan, whose results do not depend on the batch size.
    """
    while True:
        try:
            return run(batch_size), batch_size
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            log.warning("out of memory: batch size lowered to %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@dataclass
class MaskResult:
    mask: torch.Tensor  # (N, s, s) fp32 soft mask M
    fg: torch.Tensor  # (N, s, s) bool, the kept cells S
    fig: torch.Tensor
    big: torch.Tensor
    bir: torch.Tensor


class Replica:
    """Holds a loaded model on a device and runs each stage's math on batches of images."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu", precision: str = "fp32", batch_size: int = 64):
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size = batch_size

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """To the device; from pinned host memory without blocking when it is a GPU."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, x: torch.Tensor, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        with self.autocast():
            return self.adapter.logits(x, keep).float()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (N, C) in fp32 on the CPU; `keep` masks are per layer (1, heads), broadcast to the batch."""
        def run(x: torch.Tensor) -> torch.Tensor:
            k = None if keep is None else {l: m.to(self.device).expand(len(x), -1) for l, m in keep.items()}
            return self._logits(self.upload(x), k)
        out, self.batch_size = halving_on_oom(lambda size: batched(run, images, size).cpu(), self.batch_size)
        return out

    def masks(self, images: torch.Tensor, cfg: Config) -> MaskResult:
        """Learn the masks of these images together, binarise them, and measure FIG, BIG, BIR.

        The images are optimised as one batch whatever `batch_size` is: Adam's normalised steps
        amplify float rounding in near-zero gradients, so only a fixed batch composition (the
        run's mask unit) gives masks that are reproducible bit for bit.
        """
        x = self.upload(images)
        try:
            with torch.no_grad():
                q = probs(self._logits(x), cfg.tau)
            mask = optimise_masks(self._logits, x, q, mask_size=cfg.mask_size, mask_lr=cfg.mask_lr,
                                  mask_steps=cfg.mask_steps, l_js=cfg.l_js, l_1=cfg.l_1, l_tv=cfg.l_tv, tau=cfg.tau).cpu()
        except torch.OutOfMemoryError as e:  # halving would change the masks (see above), so say what to do
            raise torch.OutOfMemoryError(f"out of memory learning {len(x)} masks together on {self.device}; lower the "
                                         f"config key mask_batch (now {cfg.mask_batch}) and use a new --out, since "
                                         "it changes the masks") from e
        fg = foreground_cells(mask, cfg.keep_ratio)
        fig, big = self.gains(images, fg, cfg.tau)
        return MaskResult(mask=mask, fg=fg, fig=fig, big=big, bir=torch.from_numpy(bir(fig.numpy(), big.numpy())))

    def gains(self, images: torch.Tensor, fg: torch.Tensor, tau: float,
              keep: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(FIG, BIG) per image under the given keep-masks (intact model when None)."""
        no_bg, no_fg = counterfactuals(images, fg)
        q, q_no_fg, q_no_bg = (probs(self.logits(x, keep), tau) for x in (images, no_fg, no_bg))
        return gains(q, q_no_fg, q_no_bg)

    def swap_gains(self, images: torch.Tensor, fg: torch.Tensor, donor_images: torch.Tensor, tau: float,
                   keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """SWAP_i = JS(q(I_i), q(I_i,swap)) per image, I_swap = S_i * I_i + (1 - S_i) * I_donor (intact model when
        `keep` is None)."""
        q, q_swap = (probs(self.logits(x, keep), tau) for x in (images, swapped(images, fg, donor_images)))
        return js(q, q_swap)

    def scan(self, images: torch.Tensor, fg: torch.Tensor, heads: list[tuple[int, int]], tau: float,
             on_pairs: Callable[[int], None] | None = None, removed: list[tuple[int, int]] = (),
             measure_fig: bool = False, donor_images: torch.Tensor | None = None) -> Ablated:
        """BIG^(-h) (and FIG^(-h) with `measure_fig`, SWAP^(-h) given each image's donor image) per (head, image),
        with the `removed` heads ablated throughout."""
        no_bg, no_fg = counterfactuals(images, fg)
        x, x_no_bg = self.upload(images), self.upload(no_bg)
        x_no_fg = self.upload(no_fg) if measure_fig else None
        x_swap = self.upload(swapped(images, fg, donor_images)) if donor_images is not None else None
        fixed = {layer: k[0] for layer, k in self.keep_without(list(removed)).items()}
        out, self.batch_size = halving_on_oom(
            lambda size: scan_heads(self.adapter, x, x_no_bg, heads, tau=tau, batch_size=size, autocast=self.autocast,
                                    on_pairs=on_pairs, removed=fixed, images_no_fg=x_no_fg, images_swap=x_swap),
            self.batch_size)
        return out

    @torch.inference_mode()
    def head_output_sums(self, images: torch.Tensor) -> HeadSums:
        """The float64 sums of every head's output over these images and their tokens, on the intact model
        (mean ablation's substitutes are sums over D divided by counts), in batches of `batch_size`."""
        def run(size: int) -> HeadSums:
            total = None
            for i in range(0, len(images), size):
                with self.autocast():
                    part = self.adapter.head_output_sums(self.upload(images[i: i + size]))
                if total is None:
                    total = part
                else:
                    for layer in range(len(total.sums)):
                        total.sums[layer] += part.sums[layer]
                        total.counts[layer] += part.counts[layer]
            return total
        out, self.batch_size = halving_on_oom(run, self.batch_size)
        return out

    def keep_without(self, heads: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """Per-layer (1, heads) keep-masks that ablate the given heads together."""
        keep = {layer: torch.ones(1, n) for layer, n in enumerate(self.adapter.heads_per_layer)}
        for layer, head in heads:
            keep[layer][0, head] = 0
        return {layer: k for layer, k in keep.items() if not bool(k.all())}
